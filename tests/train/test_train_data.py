"""Training data: JSONL parsing, cached images identical to the processor's, labels, order and augmentation."""

import json

import pytest
import torch

from palitorch.errors import ConfigError
from palitorch.inference.processor import Processor
from palitorch.train.config import AugmentConfig
from palitorch.train.data import (
    Dataset,
    Images,
    augment,
    epoch_order,
    global_batch,
    read_jsonl,
    repeat_by_task,
)
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
    f.write_text("{oops\n")
    with pytest.raises(ConfigError, match=r"bad.jsonl:1: not valid JSON"):
        read_jsonl(f)
    with pytest.raises(ConfigError, match="does not exist"):
        read_jsonl(tmp_path / "none.jsonl")


def test_batches_match_the_processor_exactly(data, processor):
    ex = read_jsonl(data / "train.jsonl")
    ds = Dataset(ex, processor, Images(16))
    idx = [0, 1, 5]
    b = ds.batch(idx)
    ref = processor([e.image for e in (ex[i] for i in idx)], [ex[i].prefix for i in idx],
                    [ex[i].suffix for i in idx])
    for k in ref:
        assert torch.equal(b[k], ref[k]), k  # bit-identical pixels, ids, types and labels
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


def test_repeat_by_task(data):
    ex = read_jsonl(data / "train.jsonl")
    out = repeat_by_task(ex, {"caption": 3, "vqa": 0})
    assert len(out) == 3 * 24 and all(e.meta["task"] == "caption" for e in out)


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
