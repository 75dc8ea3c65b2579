"""Training data: JSONL parsing, cached images identical to the processor's, labels, order and augmentation."""

import json

import pytest
import torch
from PIL import Image

from palitorch.errors import ConfigError
from palitorch.inference.processor import Processor
from palitorch.train.config import AugmentConfig
from palitorch.train.data import (
    Dataset,
    augment,
    epoch_order,
    fingerprint,
    global_batch,
    grouped_order,
    read_jsonl,
    repeat_by_task,
)
from palitorch.train.images import Images
from palitorch.train.tokenizer import train_tokenizer

from trainkit import make_data


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_data(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def processor():
    tok = train_tokenizer(["caption en", "answer en what color is the shape?", "red circle blue green square"], 64)
    return Processor(tok, image_size=16, num_image_tokens=4)


def test_read_jsonl_resolves_paths_and_keeps_fields(data):
    ex = read_jsonl(data / "train.jsonl")
    assert len(ex) == 48
    assert ex[0].image == data / "img" / "train0.png" and ex[0].image.is_file()
    assert ex[1].meta == {"task": "vqa", "qtype": "color"}
    assert ex[0].where.endswith("train.jsonl:1")


def test_read_jsonl_errors_name_the_line(tmp_path):
    f = tmp_path / "bad.jsonl"
    f.write_text('{"image": "a.png", "prefix": "p", "suffix": "s"}\n{"image": "a.png", "prefix": 3}\n')
    with pytest.raises(ConfigError, match=r"bad.jsonl:2: each line needs"):
        read_jsonl(f)
    f.write_text('{"image": ["a.png", "b.png"], "prefix": "p", "suffix": "s"}\n')  # several images (their tests:
    assert read_jsonl(f)[0].image == (tmp_path / "a.png", tmp_path / "b.png")  # test_train_multi_image.py)
    f.write_text("{oops\n")
    with pytest.raises(ConfigError, match=r"bad.jsonl:1: not valid JSON"):
        read_jsonl(f)
    with pytest.raises(ConfigError, match="does not exist"):
        read_jsonl(tmp_path / "none.jsonl")
    f.write_bytes(b'{"image": "a.png", "prefix": "p", "suffix": "s"}\n{"image": "a.png", "prefix": "\xff"}\n')
    with pytest.raises(ConfigError, match=r"bad.jsonl:2: not UTF-8 text"):
        read_jsonl(f)
    f.write_text('{"image": "a.png", "prefix": "p", "suffix": "s", "task": ["caption"]}\n')
    with pytest.raises(ConfigError, match=r'bad.jsonl:1: "task" must be a string'):  # (it crashed in task_repeat)
        read_jsonl(f)
    f.write_bytes(b'\xef\xbb\xbf{"image": "a.png", "prefix": "p", "suffix": "s"}\n')  # a byte-order mark: fine
    assert read_jsonl(f)[0].prefix == "p"


def test_batches_match_the_processor_exactly(data, processor):
    ex = read_jsonl(data / "train.jsonl")
    ds = Dataset(ex, processor, Images(16))
    idx = [0, 1, 5]
    b = ds.batch(idx)
    ref = processor([e.image for e in (ex[i] for i in idx)], [ex[i].prefix for i in idx],
                    [ex[i].suffix for i in idx])
    # Each distinct image once (examples 0 and 1 show the same image), each sequence pointing at its own.
    assert b["pixel_values"].shape[0] == len({ex[i].image for i in idx}) < len(idx)
    assert torch.equal(b["pixel_values"][b["image_index"]], ref["pixel_values"])  # bit-identical pixels
    for k in ("input_ids", "attention_mask", "token_type_ids", "labels"):
        assert torch.equal(b[k], ref[k]), k
    # The loss sees exactly the suffix and <eos>: every label is -100 except the type-1 tokens.
    assert torch.equal(b["labels"] != -100, b["token_type_ids"] == 1)
    assert ds.targets[idx].sum() == (b["labels"] != -100).sum()
    assert ds.lengths[idx].sum() == b["attention_mask"].sum()


def test_missing_image_is_a_config_error(tmp_path, processor):
    f = tmp_path / "d.jsonl"
    f.write_text(json.dumps({"image": "gone.png", "prefix": "caption en", "suffix": "red"}) + "\n")
    with pytest.raises(ConfigError, match=r"d.jsonl:1: image .*gone.png.* does not exist"):
        Dataset(read_jsonl(f), processor, Images(16))


def test_order_is_a_function_of_seed_and_epoch():
    a, b = epoch_order(50, 3, 1), epoch_order(50, 3, 1)
    assert torch.equal(a, b) and sorted(a.tolist()) == list(range(50))
    assert not torch.equal(a, epoch_order(50, 3, 2)) and not torch.equal(a, epoch_order(50, 4, 1))
    # 50 examples, batch 16: 3 batches per epoch (tail dropped); step 4 is batch 1 of epoch 1.
    assert global_batch(50, 16, 3, 4) == epoch_order(50, 3, 1)[16:32].tolist()
    with pytest.raises(ConfigError, match="fewer than one batch"):
        global_batch(5, 16, 0, 0)


def test_grouped_order_keeps_an_images_examples_together():
    image_ids = torch.tensor([i % 50 for i in range(450)])  # 50 images with 9 examples each
    order = grouped_order(image_ids, 4, seed=2, epoch=0)
    assert sorted(order.tolist()) == list(range(450))
    assert torch.equal(order, grouped_order(image_ids, 4, 2, 0))
    assert not torch.equal(order, grouped_order(image_ids, 4, 2, 1))
    # Each image's 9 examples form groups of 4, 4 and 1 (150 groups), each contiguous in the order: the image
    # changes only at group boundaries (fewer when two groups of one image happen to meet).
    img = image_ids[order]
    changes = int((img[1:] != img[:-1]).sum())
    assert 0.9 * 149 <= changes <= 149
    plain = image_ids[epoch_order(450, 2, 0)]
    assert int((plain[1:] != plain[:-1]).sum()) > 400  # without grouping, neighbours almost never share an image


def test_dataset_order_groups_by_image(data, processor):
    ds = Dataset(read_jsonl(data / "train.jsonl"), processor, Images(16))
    assert torch.equal(ds.order(len(ds), 0, 0), epoch_order(len(ds), 0, 0))  # per_image 1: the plain order
    ds.per_image = 2
    idx = global_batch(len(ds), 8, 0, 1, ds.order)
    assert len({ds.examples[i].image for i in idx}) < 8
    assert ds.batch(idx)["pixel_values"].shape[0] == len({ds.examples[i].image for i in idx})


def test_repeat_by_task(data):
    ex = read_jsonl(data / "train.jsonl")
    out = repeat_by_task(ex, {"caption": 3, "vqa": 0})
    assert len(out) == 3 * 24 and all(e.meta["task"] == "caption" for e in out)
    with pytest.raises(ConfigError, match="no training example has task 'captoin'; its tasks are: caption, vqa$"):
        repeat_by_task(ex, {"captoin": 4})


def test_augmentation_is_photometric_and_split_invariant():
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (6, 3, 8, 8), generator=g, dtype=torch.uint8)
    cfg = AugmentConfig(brightness=0.3, contrast=0.3, saturation=0.2, noise=0.02)
    whole = augment(images, cfg, seed=1, step=5, positions=range(6))
    halves = torch.cat([augment(images[:2], cfg, 1, 5, range(2)), augment(images[2:], cfg, 1, 5, range(2, 6))])
    assert torch.equal(whole, halves)  # the same images however the batch is split
    assert not torch.equal(whole, images) and not torch.equal(whole, augment(images, cfg, 1, 6, range(6)))
    # Only brightness: every pixel scaled by one factor per image, so geometry (where things are) is untouched.
    flat = torch.full((1, 3, 8, 8), 100, dtype=torch.uint8)
    out = augment(flat, AugmentConfig(brightness=0.5), 0, 0, range(1))
    assert out.unique().numel() == 1


def test_read_jsonl_skips_blank_lines_and_refuses_a_file_without_examples(tmp_path):
    """Blank lines (a trailing newline too many, a gap between blocks) are skipped but still counted, so an error
    names the line an editor shows; a file of blank lines, or a folder or a device, is refused by name."""
    f = tmp_path / "d.jsonl"
    line = json.dumps({"image": "a.png", "prefix": "p", "suffix": "s"})
    f.write_text(f"\n{line}\n  \n{line}\n\n")
    assert [e.where for e in read_jsonl(f)] == [f"{f}:2", f"{f}:4"]
    f.write_text("\n \n")
    with pytest.raises(ConfigError, match="d.jsonl has no examples"):
        read_jsonl(f)
    with pytest.raises(ConfigError, match="is a folder: give a JSONL file"):
        read_jsonl(tmp_path)
    with pytest.raises(ConfigError, match="'/dev/null' is not a regular file"):  # (it exists: not "does not exist")
        read_jsonl("/dev/null")


def test_fingerprint_covers_every_training_file(tmp_path):
    """A resume compares this hash: a change to any of the files, not only the first, must change it."""
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_text("one\n")
    b.write_text("two\n")
    before = fingerprint([str(a), str(b)])
    b.write_text("two!\n")
    assert fingerprint([str(a), str(b)]) != before


def test_dataset_refuses_bad_examples_before_training_naming_the_line(tmp_path, processor):
    """An image path that is a folder, and a prompt the processor refuses, are ConfigErrors naming the line."""
    (tmp_path / "dir.png").mkdir()
    f = tmp_path / "d.jsonl"
    f.write_text(json.dumps({"image": "dir.png", "prefix": "caption en", "suffix": "red"}) + "\n")
    with pytest.raises(ConfigError, match=r"d.jsonl:1: image .*dir.png.* is a folder"):
        Dataset(read_jsonl(f), processor, Images(16))
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    f.write_text(json.dumps({"image": "a.png", "prefix": "caption <image>", "suffix": "red"}) + "\n")
    with pytest.raises(ConfigError, match=r"d.jsonl:1: the text contains <image>"):
        Dataset(read_jsonl(f), processor, Images(16))


def test_max_length_admits_an_example_of_exactly_that_length(data, processor):
    ex = read_jsonl(data / "train.jsonl")
    longest = int(Dataset(ex, processor, Images(16)).lengths.max())
    Dataset(ex, processor, Images(16), max_length=longest)
    with pytest.raises(ConfigError, match=f"the example is {longest} tokens with the image, over .*max_length "
                                          f"{longest - 1}"):
        Dataset(ex, processor, Images(16), max_length=longest - 1)


def test_grouped_dataset_order_changes_with_the_epoch(data, processor):
    """Dataset.order keeps one epoch's grouped order; asking for the next epoch must not return the cached one."""
    ds = Dataset(read_jsonl(data / "train.jsonl"), processor, Images(16), per_image=2)
    for epoch in (0, 1, 2, 1):
        assert torch.equal(ds.order(len(ds), 5, epoch), grouped_order(ds.image_ids, 2, 5, epoch)), epoch


def test_batch_augmentation_follows_the_image_not_its_place_in_the_batch(data, processor):
    """An image is jittered alike in every batch, micro-batch or process share that holds it (the key is its path),
    so splitting a global batch differently changes no pixel."""
    ds = Dataset(read_jsonl(data / "train.jsonl"), processor, Images(16))
    cfg = AugmentConfig(brightness=0.4, contrast=0.4)
    idx = [0, 2, 4, 6]
    whole = ds.batch(idx, cfg, seed=1, step=3)
    for part in (idx[1:], idx[2:], idx[::-1]):
        pv = ds.batch(part, cfg, seed=1, step=3)
        for b, i in enumerate(part):
            a = whole["pixel_values"][whole["image_index"][idx.index(i)]]
            assert torch.equal(pv["pixel_values"][pv["image_index"][b]], a), (part, i)


def two_tone(n: int = 8) -> torch.Tensor:
    """n uint8 [3, 8, 8] images, each half 100 and half 140 in every channel: no clipping under +-40% jitter."""
    x = torch.full((n, 3, 8, 8), 100, dtype=torch.uint8)
    x[:, :, :, 4:] = 140
    return x


def test_contrast_scales_around_the_mean_by_a_draw_of_its_own():
    """Contrast keeps each image's mean (only the spread changes), brightness each pixel ratio (it scales), and the
    two factors differ: the jitters are independent draws."""
    x = two_tone()
    contrast = augment(x, AugmentConfig(contrast=0.4), 0, 0, range(8)).float()
    bright = augment(x, AugmentConfig(brightness=0.4), 0, 0, range(8)).float()
    assert (contrast.mean((1, 2, 3)) - 120).abs().max() <= 0.5  # rounding only
    spread = (contrast[:, :, :, 4:].mean((1, 2, 3)) - contrast[:, :, :, :4].mean((1, 2, 3))) / 40
    scale = bright.mean((1, 2, 3)) / 120
    assert (spread - 1).abs().max() > 0.05
    ratio = bright[:, :, :, 4:].mean((1, 2, 3)) / bright[:, :, :, :4].mean((1, 2, 3))
    assert (ratio - 1.4).abs().max() < 0.02  # (rounding: 140 / 100 within 1 level of 100)
    assert (spread - scale).abs().max() > 0.05


def test_saturation_keeps_luma_and_noise_is_added():
    """Saturation moves each pixel away from (or towards) its own luma, which it keeps; noise alone changes a flat
    image by about its std."""
    g = torch.Generator().manual_seed(0)
    x = torch.randint(60, 190, (4, 3, 8, 8), generator=g, dtype=torch.uint8)
    out = augment(x, AugmentConfig(saturation=0.3), 0, 0, range(4)).float()

    def luma(im):
        return 0.299 * im[:, 0] + 0.587 * im[:, 1] + 0.114 * im[:, 2]

    assert not torch.equal(out, x.float())
    assert (luma(out) - luma(x.float())).abs().max() <= 0.6  # rounding each channel: at most half a level
    flat = torch.full((1, 3, 32, 32), 128, dtype=torch.uint8)
    noisy = augment(flat, AugmentConfig(noise=0.05), 0, 0, range(1)).float()
    assert 0.8 * 0.05 * 255 < noisy.std() < 1.2 * 0.05 * 255 and abs(noisy.mean() - 128) < 2


def test_a_seed_is_no_shifted_copy_of_another():
    """Seed s + 1's first epoch is not seed s's second: two runs with neighbouring seeds see different orders."""
    for s in range(3):
        assert not torch.equal(epoch_order(40, s, 1), epoch_order(40, s + 1, 0))
        ids = torch.arange(40) // 4
        assert not torch.equal(grouped_order(ids, 2, s, 1), grouped_order(ids, 2, s + 1, 0))


def test_a_lone_surrogate_escape_is_refused_naming_the_line_and_field(tmp_path):
    r"""JSON may write "\ud800", which parses to a string no UTF-8 text holds: the from-scratch tokenizer and the
    printed evaluation summary (a "task" group) could not take it and stopped with a traceback, the second after
    the whole run. read_jsonl refuses it, any field, naming the line; an escaped pair (an emoji) is one character."""
    f = tmp_path / "d.jsonl"
    ok = {"image": "a.png", "prefix": "caption en", "suffix": "\U0001F600"}
    for field, value in (("prefix", "a\ud800"), ("suffix", "\udfff"), ("task", "b\uD800"), ("extra", ["\ud800"])):
        f.write_text(json.dumps(ok) + "\n" + json.dumps({**ok, field: value}) + "\n")  # (json.dumps escapes them)
        with pytest.raises(ConfigError, match=rf'd.jsonl:2: "{field}" holds a lone surrogate'):
            read_jsonl(f)
    f.write_text(json.dumps(ok) + "\n")
    assert read_jsonl(f)[0].suffix == "\U0001F600"
