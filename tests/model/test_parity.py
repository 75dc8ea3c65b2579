"""palitorch vs transformers on tiny random checkpoints, float32.

Tolerances: logits within 1e-4 absolute (logits here are of order 1-30), loss within 1e-5. In practice the two
agree to float32 rounding, since both run the same operations in the same order.
"""

import pytest
import torch

import palitorch

from hf_factory import hf_processor, hf_suffix_logprobs

LOGIT_TOL, LOSS_TOL = 1e-4, 1e-5

VARIANTS = {
    "pg1-224-mqa": dict(version=1),
    "pg1-224-mha-patch9": dict(version=1, heads=4, kv_heads=4, patch_size=9, layout="old"),
    "pg2-224-gqa": dict(version=2, kv_heads=2),
    "pg2-448-mqa": dict(version=2, image_size=448, layout="new", shards=2),
    "pg2-224-window8": dict(version=2, kv_heads=2, text_extra=dict(sliding_window=8), layers=3),
    "pg1-224-patch16-wide": dict(version=1, heads=2, kv_heads=1, head_dim=32, patch_size=16, layers=3),
}


def _images(n, seed=0):
    from PIL import Image

    g = torch.Generator().manual_seed(seed)
    sizes = [(100, 130), (64, 64), (301, 77), (224, 224)]
    return [Image.fromarray(torch.randint(0, 256, (*sizes[i % 4], 3), generator=g, dtype=torch.uint8).numpy())
            for i in range(n)]


@pytest.fixture(scope="module", params=list(VARIANTS))
def variant(request, ckpt_factory):
    folder, hf = ckpt_factory(request.param, **VARIANTS[request.param])
    return palitorch.load(folder), hf, hf_processor(folder)


def test_training_batch_logits_and_loss(variant):
    """Right-padded batch with prompts and suffixes of different lengths, labels on the suffix only."""
    pipe, hf, proc = variant
    prompts = ["caption en", "answer en what color is the shape?", "detect cat ; dog"]
    suffixes = ["a cat sitting on a bench", "red", "<loc0010><loc0020><loc0500><loc0600> cat"]
    inputs = proc(images=_images(3), text=prompts, suffix=suffixes, return_tensors="pt", padding="longest")
    assert (inputs["attention_mask"] == 0).any(), "the batch must contain padding"
    assert_training_batch_parity(pipe, hf, inputs)


def assert_training_batch_parity(pipe, hf, inputs):
    """Logits at the real tokens within LOGIT_TOL and the loss within LOSS_TOL of transformers' on a training batch."""
    with torch.no_grad():
        ref = hf(**inputs)
        ours = pipe.model(inputs["input_ids"], inputs["pixel_values"], inputs["attention_mask"],
                          inputs["token_type_ids"], labels=inputs["labels"])
    valid = inputs["attention_mask"].bool()
    torch.testing.assert_close(ours.logits[valid], ref.logits[valid], atol=LOGIT_TOL, rtol=0)
    assert abs(ours.loss.item() - ref.loss.item()) < LOSS_TOL


def test_left_padded_prompt_batch(variant):
    """Inference-style batch: prompt only (all prefix), left padding, positions counted over real tokens."""
    pipe, hf, proc = variant
    proc.tokenizer.padding_side = "left"
    inputs = proc(images=_images(2, seed=1), text=["ocr", "answer en is there a blue circle in the image?"],
                  return_tensors="pt", padding="longest")
    proc.tokenizer.padding_side = "right"
    mask = inputs["attention_mask"]
    positions = mask.cumsum(-1).masked_fill(mask == 0, 1)  # 1-based over real tokens, as transformers' generate
    with torch.no_grad():
        ref = hf(**inputs, position_ids=positions)
        ours = pipe.model(inputs["input_ids"], inputs["pixel_values"], mask, inputs["token_type_ids"])
    valid = mask.bool()
    torch.testing.assert_close(ours.logits[valid], ref.logits[valid], atol=LOGIT_TOL, rtol=0)


def test_score_equals_transformers_logprobs(variant):
    pipe, hf, proc = variant
    img = _images(1, seed=2)[0]
    r = pipe.score(img, "caption en", "two dogs play in the snow")
    ids, ref = hf_suffix_logprobs(proc, hf, img, "caption en", "two dogs play in the snow")
    assert r.token_ids == ids
    assert r.token_ids[-1] == pipe.processor.token_id("<eos>")
    torch.testing.assert_close(torch.tensor(r.logprobs), ref, atol=LOGIT_TOL, rtol=0)


def test_score_batch_equals_single(pg2):
    folder, _ = pg2
    pipe = palitorch.load(folder)
    imgs = _images(3, seed=3)
    prefixes = ["caption en", "answer en what color is the shape?", "ocr"]
    suffixes = ["yes", "a cat sitting on a bench in the snow", "the quick brown fox"]
    batch = pipe.score(imgs, prefixes, suffixes)
    for img, p, s, b in zip(imgs, prefixes, suffixes, batch):
        one = pipe.score(img, p, s)
        assert one.token_ids == b.token_ids
        torch.testing.assert_close(torch.tensor(b.logprobs), torch.tensor(one.logprobs), atol=1e-5, rtol=0)


def test_sliding_window_changes_the_answer(ckpt_factory):
    """Guard for the windowed variant above: a window of 8 must matter on this sequence, or the test proves nothing."""
    folder, hf = ckpt_factory("pg2-224-window8", **VARIANTS["pg2-224-window8"])
    pipe = palitorch.load(folder)
    img = _images(1)[0]
    with_window = pipe.score(img, "caption en", "a cat sitting on a bench in the snow").logprobs
    import dataclasses

    cfg = pipe.model.cfg
    pipe.model.cfg = cfg.replace(text=dataclasses.replace(cfg.text, sliding_window=None))
    for layer in pipe.model.language_model.layers:
        layer.attn.sliding = False
    without = pipe.score(img, "caption en", "a cat sitting on a bench in the snow").logprobs
    assert max(abs(a - b) for a, b in zip(with_window, without)) > 1e-3


def test_loss_only_forward_equals_full(pg2):
    """The training path (LM head at scored positions only) gives the full forward's loss."""
    folder, _ = pg2
    pipe = palitorch.load(folder)
    enc = [pipe.processor.encode("caption en", "a cat"), pipe.processor.encode("ocr", "the quick brown fox")]
    b = pipe.processor.collate(enc, torch.stack([pipe.processor.pixels(im) for im in _images(2)]))
    with torch.no_grad():
        full = pipe.model(**b)
        lean = pipe.model(**b, return_logits=False)
    assert lean.logits is None
    assert abs(full.loss.item() - lean.loss.item()) <= 1e-6 * abs(full.loss.item())  # float32 summation order


def test_shared_images_equal_repeated_images(pg2):
    """image_index (several sequences about one image, the vision tower run once) == the image repeated per row."""
    folder, _ = pg2
    pipe = palitorch.load(folder)
    enc = [pipe.processor.encode(p, s) for p, s in [("caption en", "a cat"), ("ocr", "fox"), ("caption en", "dog")]]
    pixels = torch.stack([pipe.processor.pixels(im) for im in _images(2)])
    index = torch.tensor([1, 0, 1])
    rep = pipe.processor.collate(enc, pixels[index])
    shared = pipe.processor.collate(enc, pixels)
    with torch.no_grad():
        a = pipe.model(**rep)
        b = pipe.model(**shared, image_index=index)
    assert (a.logits - b.logits).abs().max() <= 1e-5  # float32; the same arithmetic per row
    assert abs(a.loss.item() - b.loss.item()) <= 1e-6 * abs(a.loss.item())


@pytest.mark.parametrize("kv_heads", [1, 2])
def test_masked_attention_with_repeated_kv_heads(ckpt_factory, monkeypatch, kv_heads):
    """On CUDA, masked SDPA over many queries (prefill, scoring, training) gets every query head its own copy of
    its KV head, because the fused kernels there take a mask or grouped heads but not both. Forced on CPU here:
    the logits of a padded training batch and greedy generation still match transformers'."""
    from palitorch.model import gemma

    folder, hf = ckpt_factory(f"pg1-224-kv{kv_heads}-of-4", version=1, heads=4, kv_heads=kv_heads)
    pipe = palitorch.load(folder)
    proc = hf_processor(folder)
    monkeypatch.setattr(gemma, "FULL_HEADS_FOR_MASKED_SDPA", ("cpu", "cuda"))
    repeated = []
    full_heads = gemma.Attention._full_heads
    monkeypatch.setattr(gemma.Attention, "_full_heads",
                        lambda self, k, v: repeated.append(k.shape) or full_heads(self, k, v))
    prompts = ["caption en", "answer en what color is the shape?"]
    inputs = proc(images=_images(2), text=prompts, suffix=["a cat", "red"], return_tensors="pt", padding="longest")
    with torch.no_grad():
        ref = hf(**inputs)
        ours = pipe.model(inputs["input_ids"], inputs["pixel_values"], inputs["attention_mask"],
                          inputs["token_type_ids"], labels=inputs["labels"])
    assert len(repeated) == hf.config.text_config.num_hidden_layers
    valid = inputs["attention_mask"].bool()
    torch.testing.assert_close(ours.logits[valid], ref.logits[valid], atol=LOGIT_TOL, rtol=0)
    assert abs(ours.loss.item() - ref.loss.item()) < LOSS_TOL
    proc.tokenizer.padding_side = "left"
    gen = proc(images=_images(2, seed=3), text=prompts, return_tensors="pt", padding="longest")
    ref_tokens = hf.generate(**gen, max_new_tokens=8, min_new_tokens=8, do_sample=False)[:, gen["input_ids"].shape[1]:]
    ours = pipe.generate(_images(2, seed=3), prompts, max_new_tokens=8, min_new_tokens=8)
    assert [r.token_ids for r in ours] == ref_tokens.tolist()
