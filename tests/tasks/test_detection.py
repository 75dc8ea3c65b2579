"""parse_detections: PaliGemma's <locY0><locX0><locY1><locX1> label groups -> pixel boxes (tolerance 1e-9 px)."""

import pytest

from palitorch.tasks import Detection, parse_detections


def loc(*values):
    return "".join(f"<loc{v:04d}>" for v in values)


def assert_box(actual, expected):
    assert actual == pytest.approx(expected, abs=1e-9)


def test_one_object_uses_the_1023_grid_and_yx_order():
    (d,) = parse_detections(loc(0, 1023, 1023, 0) + " cat", width=640, height=480)
    assert d.label == "cat"
    # y0=0, x0=1023, y1=1023, x1=0: reordered so that x0 <= x1 and y0 <= y1.
    assert_box(d.box, (0.0, 0.0, 640.0, 480.0))
    (d,) = parse_detections(loc(100, 200, 300, 400) + " cat", width=1023, height=2046)
    assert_box(d.box, (200.0, 200.0, 400.0, 600.0))


def test_several_objects_and_multiword_labels():
    text = loc(0, 0, 511, 511) + " cat ; " + loc(512, 512, 1023, 1023) + " red car;" + loc(10, 20, 30, 40) + "dog"
    ds = parse_detections(text, 1023, 1023)
    assert [d.label for d in ds] == ["cat", "red car", "dog"]
    assert_box(ds[1].box, (512, 512, 1023, 1023))
    assert_box(ds[2].box, (20, 10, 40, 30))
    assert ds[0].to_dict() == {"label": "cat", "box": [0, 0, 511, 511]}


def test_spaces_between_tokens_are_tolerated():
    ds = parse_detections("  <loc0010> <loc0020>\n<loc0030>  <loc0040>   cat  ", 1023, 1023)
    assert ds == [Detection("cat", (20.0, 10.0, 40.0, 30.0))]


@pytest.mark.parametrize("text", [
    "", "a cat on a bench", loc(1, 2, 3) + " cat", loc(1, 2, 3, 4, 5) + " cat", "<loc12> <loc0001><loc0002><loc0003> x",
    "<loc00010><loc0001>" * 2, loc(1, 2, 3, 4) + " cat <seg001>",
])
def test_malformed_text_gives_nothing(text):
    assert parse_detections(text, 100, 100) == []


def test_a_run_of_locations_starts_an_object_as_big_visions_demo_parser_reads_it():
    # A missing " ; ", or other text before the first object, loses nothing (the text before is skipped).
    ds = parse_detections(loc(0, 0, 1023, 1023) + " cat " + loc(0, 0, 511, 511) + " dog", 1023, 1023)
    assert [d.label for d in ds] == ["cat", "dog"]
    assert_box(ds[1].box, (0, 0, 511, 511))
    assert parse_detections("here: " + loc(0, 0, 1023, 1023) + " cat", 10, 10) == [Detection("cat", (0, 0, 10, 10))]
    assert parse_detections("cat " + loc(0, 0, 1023, 1023), 10, 10) == [Detection("", (0, 0, 10, 10))]


def test_long_runs_of_spaces_parse_in_linear_time():
    # The old pattern's lazy label backtracked over whitespace: 32,000 spaces then a letter took 7.6 s, so a
    # million would take hours (this test would never end); a linear parse takes milliseconds.
    text = loc(1, 2, 3, 4) + " cat" + " " * 1_000_000 + "x"
    (d,) = parse_detections(text, 10, 10)
    assert d.label.startswith("cat") and d.label.endswith(" x")


def test_the_image_itself_gives_the_upright_size(tmp_path):
    from PIL import Image

    photo = Image.new("RGB", (64, 128))  # stored sideways: orientation 8 turns it into 128 x 64
    exif = photo.getexif()
    exif[0x0112] = 8
    photo.save(tmp_path / "p.jpg", exif=exif)
    text = loc(0, 0, 1023, 1023) + " cat"
    want = [Detection("cat", (0.0, 0.0, 128.0, 64.0))]
    assert parse_detections(text, Image.open(tmp_path / "p.jpg")) == want
    assert parse_detections(text, tmp_path / "p.jpg") == want


def test_malformed_groups_are_skipped_and_good_ones_kept():
    text = " ; ".join([loc(1, 2, 3) + " bad", loc(0, 0, 1023, 1023) + " good", "garbage", loc(9, 9, 9, 9, 9) + " x"])
    assert parse_detections(text, 10, 10) == [Detection("good", (0.0, 0.0, 10.0, 10.0))]


def test_out_of_range_locations_are_clamped_to_the_image():
    (d,) = parse_detections("<loc0500><loc2000><loc9999><loc0000> cat", 200, 100)
    assert_box(d.box, (0.0, 500 / 1023 * 100, 200.0, 100.0))


def test_segmentation_answers_also_give_their_boxes():
    text = loc(0, 0, 1023, 1023) + "".join(f"<seg{i:03d}>" for i in range(16)) + " cat"
    assert parse_detections(text, 50, 50) == [Detection("cat", (0.0, 0.0, 50.0, 50.0))]


def test_box_without_label_is_kept_with_an_empty_label():
    assert parse_detections(loc(0, 0, 1023, 1023), 8, 8) == [Detection("", (0.0, 0.0, 8.0, 8.0))]


def test_a_prompt_that_starts_with_image_is_still_a_detect_prompt():
    from palitorch.tasks import task_of, task_outputs

    assert task_of("<image>detect cat") == task_of("<image> detect cat") == "detect"
    out = task_outputs("<image>detect cat", loc(0, 0, 1023, 1023) + " cat", 10, 10)
    assert out == {"detections": [{"label": "cat", "box": [0, 0, 10, 10]}]}


def test_boxes_keep_two_decimals_in_json():
    """to_dict (the server's and the CLI's JSON) rounds pixel coordinates to hundredths, not to whole pixels."""
    (d,) = parse_detections(loc(100, 200, 300, 400) + " cat", 640, 480)
    assert d.to_dict() == {"label": "cat", "box": [125.12, 46.92, 250.24, 140.76]}


def test_the_task_word_is_read_in_any_case():
    from palitorch.tasks import task_of, task_outputs

    assert task_of("Detect cat") == task_of("<image>DETECT cat") == "detect"
    assert task_of("Segment cat") == "segment"
    out = task_outputs("Detect cat", loc(0, 0, 1023, 1023) + " cat", 10, 10)
    assert out == {"detections": [{"label": "cat", "box": [0, 0, 10, 10]}]}


def test_task_outputs_of_each_task_in_pixels_of_a_wide_image():
    """task_outputs (the objects of `run --json`, `batch` and `serve`): a segment prompt's segmentations and a detect
    prompt's detections, boxes in pixels of the width x height image (a wide one: width and height swapped would
    show), and nothing for another task or an empty prompt. Found by mutation testing: segmentations dropped, or
    their sides swapped, passed every test."""
    from palitorch.tasks import parse_segmentations, task_outputs

    seg = loc(100, 200, 300, 400) + "".join(f"<seg{i:03d}>" for i in range(16)) + " cat"
    want = [s.to_dict() for s in parse_segmentations(seg, 640, 480)]
    assert want and want[0]["box"] == [125.12, 46.92, 250.24, 140.76]
    assert task_outputs("segment cat", seg, 640, 480) == {"segmentations": want}
    assert task_outputs("detect cat", seg, 640, 480)["detections"][0]["box"] == want[0]["box"]
    for prompt in ("caption en", "", "   "):
        assert task_outputs(prompt, seg, 640, 480) == {}


def test_an_answer_ends_at_its_eos_as_text_decoded_with_special_tokens_shows_it():
    """Text decoded with special tokens kept (transformers' `decode(..., skip_special_tokens=False)`) ends
    `cat<eos>`, padded rows then `<pad>`s: the label is `cat`, as Google's parser reads it (a label stops at `<`),
    not `cat<eos>`; nothing after the `<eos>` is an object. Found by a checker: the label kept `<eos><pad>`."""
    from palitorch.tasks import parse_segmentations

    box = loc(0, 0, 1023, 1023)
    text = "<bos>detect cat\n" + box + " cat ; " + loc(0, 0, 511, 511) + " dog<eos><pad><pad>"
    assert [d.label for d in parse_detections(text, 10, 10)] == ["cat", "dog"]
    assert parse_detections(box + " cat<eos>" + box + " ghost", 10, 10) == [Detection("cat", (0.0, 0.0, 10.0, 10.0))]
    seg = box + "".join(f"<seg{i:03d}>" for i in range(16)) + " cat<eos>"
    assert [(s.label, s.codes) for s in parse_segmentations(seg, 10, 10)] == [("cat", tuple(range(16)))]
