"""draw_detections: an RGB copy of the image, same size, boxes and label tabs in per-label colours."""

import numpy as np
from PIL import Image

from palitorch.tasks import Detection, draw_detections
from palitorch.tasks.draw import MASK_ALPHA, PALETTE, label_colours


def test_draws_boxes_and_labels_and_saves_a_png_of_the_same_size(tmp_path):
    image = Image.new("RGB", (320, 200), (128, 128, 128))
    dets = [Detection("cat", (40.0, 60.0, 200.0, 180.0)), Detection("dog", (210.0, 0.0, 319.0, 90.0)),
            Detection("cat", (10.0, 10.0, 30.0, 30.0))]
    out = draw_detections(image, dets)
    out.save(tmp_path / "boxes.png")
    back = Image.open(tmp_path / "boxes.png")
    assert back.size == (320, 200) and back.mode == "RGB"
    px = np.asarray(back)
    cat, dog = label_colours(["cat", "dog"]).values()
    assert cat != dog
    assert tuple(px[120, 40]) == cat  # left edge of the first cat box
    assert tuple(px[60, 318]) == dog  # right edge of the dog box (x1 = 319, its last column 318; it touches the top:
    # its tab is drawn inside)
    assert tuple(px[20, 10]) == cat  # the second cat box shares the colour
    assert (px == cat).all(-1)[40:60, 40:120].any()  # the label tab above the first box
    assert tuple(np.asarray(image)[120, 40]) == (128, 128, 128)  # the input is not modified


def test_label_colours_are_distinct_then_cycle():
    labels = [f"l{i}" for i in range(len(PALETTE) + 1)]
    colours = label_colours(labels)
    assert len(set(list(colours.values())[: len(PALETTE)])) == len(PALETTE)
    assert colours[labels[-1]] == colours[labels[0]]


def test_masks_are_blended_and_other_modes_accepted():
    image = Image.new("L", (40, 30), 0)
    mask = np.zeros((30, 40), bool)
    mask[12:18, 12:20] = True
    out = draw_detections(image, [Detection("x", (5.0, 5.0, 35.0, 25.0))], masks=[mask])
    px = np.asarray(out).astype(int)
    assert out.mode == "RGB" and out.size == (40, 30)
    assert px[15, 15].sum() > 0 and px[2, 2].sum() == 0  # tinted inside the mask, untouched outside the box


def test_a_box_to_the_image_edge_is_drawn_on_its_last_pixels():
    # A box's x1, y1 are the edge past the object (the image's width and height for <loc1023>).
    out = np.asarray(draw_detections(Image.new("RGB", (400, 200)), [Detection("", (0.0, 0.0, 400.0, 200.0))]))
    lit = out.any(-1)
    assert lit[:, 399].all() and lit[199, :].all() and lit[:, 0].all() and lit[0, :].all()


def test_a_photo_is_drawn_upright_as_the_model_saw_it(tmp_path):
    photo = Image.new("RGB", (64, 128), (200, 200, 200))  # stored sideways; orientation 8 makes it 128 x 64
    exif = photo.getexif()
    exif[0x0112] = 8
    photo.save(tmp_path / "p.jpg", exif=exif)
    for image in (Image.open(tmp_path / "p.jpg"), tmp_path / "p.jpg"):
        assert draw_detections(image, [Detection("cat", (0.0, 0.0, 128.0, 64.0))]).size == (128, 64)


def test_a_mask_is_blended_at_mask_alpha_and_rounded():
    """Inside a mask a pixel is (1 - MASK_ALPHA) of the image plus MASK_ALPHA of the label's colour, rounded to the
    nearest level (60.75 -> 61); outside the mask (and the box's outline) it is untouched. Tolerance: none."""
    image = Image.new("RGB", (40, 30), (90, 90, 90))
    mask = np.zeros((30, 40), bool)
    mask[12:18, 12:20] = True
    px = np.asarray(draw_detections(image, [Detection("", (5.0, 5.0, 35.0, 25.0))], masks=[mask])).astype(int)
    want = np.rint((1 - MASK_ALPHA) * 90 + MASK_ALPHA * np.array(PALETTE[0])).astype(int)
    assert px[15, 15].tolist() == want.tolist() == [153, 61, 83]
    assert px[10, 10].tolist() == [90, 90, 90]


def test_label_text_is_black_on_light_tabs_and_white_on_dark_ones():
    """The text's colour is chosen by the tab's luminance (Rec. 601 weights): white on the first palette colour
    (dark red), black on the fourth (orange, luminance 155) and on the eighth (lime)."""
    labels = [f"l{i}" for i in range(8)]
    dets = [Detection(label, (10.0 + 40 * i, 60.0, 40.0 + 40 * i, 90.0)) for i, label in enumerate(labels)]
    px = np.asarray(draw_detections(Image.new("RGB", (340, 100), (128, 128, 128)), dets))
    colours = label_colours(labels)
    for i, white in ((0, True), (3, False), (7, False)):
        tab = px[:60, 10 + 40 * i: 40 + 40 * i].astype(int)
        assert (tab == colours[labels[i]]).all(-1).any(), i  # the tab
        near_white, near_black = (tab.min(-1) > 200).sum(), (tab.max(-1) < 55).sum()  # (the text is antialiased)
        assert (near_white, near_black)[not white] > 0 and (near_black, near_white)[not white] == 0, i


def test_a_box_without_a_label_is_only_its_outline_of_the_images_width_over_200():
    """No tab for an empty label; the outline is round(400 / 200) = 2 pixels wide, inside the box."""
    px = np.asarray(draw_detections(Image.new("RGB", (400, 400)), [Detection("", (100.0, 100.0, 300.0, 300.0))]))
    want = np.zeros((400, 400), bool)
    want[100:300, 100:300] = True
    want[102:298, 102:298] = False
    assert np.array_equal(px.any(-1), want)


def test_a_label_tab_stays_inside_the_image_at_its_left_and_right_edges():
    """A box at the right edge puts its tab leftwards so that the label fits; a box starting left of the image
    draws its tab as a box at x = 0 does."""
    image = Image.new("RGB", (320, 200))
    right = np.asarray(draw_detections(image, [Detection("a long label", (300.0, 100.0, 320.0, 150.0))]))
    colour = label_colours(["a long label"])["a long label"]
    assert (right[:100, :300] == colour).all(-1).any() and right[:100, 319].any()
    off = np.asarray(draw_detections(image, [Detection("cat", (-20.0, 50.0, 100.0, 150.0))]))
    at0 = np.asarray(draw_detections(image, [Detection("cat", (0.0, 50.0, 100.0, 150.0))]))
    assert (off[:50] == at0[:50]).all() and off[:50].any()


def test_a_box_made_with_its_corners_reversed_draws_the_same_and_a_nan_one_is_refused():
    """A hand-made Detection with (x1, y1, x0, y0) draws as (x0, y0, x1, y1) does (it drew a line at x0), and a
    box that is not four finite numbers is an InputError naming it (a NaN corner was Pillow's ValueError)."""
    import pytest

    from palitorch.errors import InputError

    img = Image.new("RGB", (60, 40), "white")
    want = np.asarray(draw_detections(img, [Detection("cat", (10.0, 5.0, 50.0, 30.0))]))
    got = np.asarray(draw_detections(img, [Detection("cat", (50.0, 30.0, 10.0, 5.0))]))
    assert np.array_equal(got, want)
    for box in ((10.0, float("nan"), 50.0, 30.0), (10.0, 5.0, 50.0)):
        with pytest.raises(InputError, match="draw_detections: a box is"):
            draw_detections(img, [Detection("cat", box)])
