"""Edges of `generate` that answers of the usual length never reach: a prompt that fills the context exactly, the
tokenizer's own <eos> when the checkpoint lists other EOS ids, and two stop strings completed by the same token."""

import pytest
import torch
from test_generate import images

import palitorch
from palitorch.errors import InputError
from palitorch.inference import generate as engine

from hf_factory import diverse


def prompt_of(pipe, n: int) -> str:
    """A prompt that encodes (image tokens included) to exactly n tokens: "caption en a a ...", its count of " a"
    found by stepping by the tokens still missing (a handful of encodings, not one per length)."""
    def length(k):
        return len(pipe.processor.encode("caption en" + " a" * k).ids)

    k = 0
    for _ in range(50):
        missing = n - length(k)
        if missing == 0:
            return "caption en" + " a" * k
        if missing < 0 or length(k + 1) > n:
            break
        k += max(1, missing)
    raise AssertionError("no prompt of exactly that length")


def test_a_prompt_that_fills_the_context_is_refused_and_one_token_less_leaves_room_for_one(ckpt_factory):
    pipe = palitorch.load(diverse(ckpt_factory, 1)[0])
    context = pipe.cfg.text.max_position_embeddings
    with pytest.raises(InputError, match="no room"):
        pipe.generate(images(1)[0], prompt_of(pipe, context), max_new_tokens=4)
    r = pipe.generate(images(1)[0], prompt_of(pipe, context - 1), max_new_tokens=4)
    assert (len(r.token_ids), r.finish_reason, r.prompt_tokens) == (1, "length", context - 1)


def scripted(monkeypatch, ids):
    """Make `generate` decode the given token ids (one row), whatever the model would choose."""
    def decode(model, prompts, opts, eos, pad_id, steps, fns=None, row_steps=None):
        for i in ids[:steps]:
            yield torch.tensor([i]), torch.tensor([-1.0]), None

    monkeypatch.setattr(engine, "decode", decode)


def test_the_tokenizers_eos_ends_an_answer_whatever_eos_ids_the_checkpoint_lists(monkeypatch):
    """A checkpoint whose config lists another EOS id (here the token of "a"): the tokenizer's <eos> still ends the
    answer, and is not in it."""
    pipe = palitorch.load()
    words = pipe.processor.tokenizer.encode("a red cat", add_special_tokens=False).ids
    other = words[0]
    pipe.model.cfg = pipe.model.cfg.replace(eos_token_ids=(other,))
    scripted(monkeypatch, words[1:] + [pipe.processor.eos_id] + words)
    r = pipe.generate(images(1)[0], "caption en", max_new_tokens=20)
    assert (r.token_ids, r.finish_reason) == (words[1:], "eos")


def test_of_two_stop_strings_completed_by_one_token_the_text_ends_at_the_earlier(monkeypatch):
    """Stop strings "cat" and "t" both end with the token that writes "cat": the text ends before the first one
    that begins, "cat" (as OpenAI cuts at the earliest stop sequence)."""
    pipe = palitorch.load()
    text = "a big cat sat"
    ids = pipe.processor.tokenizer.encode(text, add_special_tokens=False).ids
    scripted(monkeypatch, ids)
    end = next(n for n in range(1, len(ids) + 1) if "cat" in pipe.processor.decode(ids[:n]))
    assert "t" not in pipe.processor.decode(ids[:end - 1])  # (both are completed by the same token)
    for stop in (["t", "cat"], ["cat", "t"]):
        r = pipe.generate(images(1)[0], "caption en", max_new_tokens=20, stop=stop)
        assert (r.text, r.finish_reason, r.token_ids) == ("a big ", "stop", ids[:end]), stop
        s = pipe.stream(images(1)[0], "caption en", max_new_tokens=20, stop=stop)
        assert "".join(s) == "a big "


@pytest.mark.parametrize("penalty", [1.0, 1.01])
def test_min_new_tokens_bars_eos_for_exactly_that_many_steps(ckpt_factory, penalty):
    """With a token the model chooses at step j (its first time) made the EOS: min_new_tokens=j leaves step j free
    to end the answer there, j + 1 bars it. Greedy runs the fused step from step 1 on (penalty 1.0), a repetition
    penalty the unfused one (1.01, too weak to change these choices)."""
    pipe = palitorch.load(diverse(ckpt_factory, 1)[0])
    img = images(1)[0]
    free = pipe.generate(img, "caption en", max_new_tokens=24, min_new_tokens=24, repetition_penalty=penalty)
    j = next(i for i, t in enumerate(free.token_ids) if i >= 3 and t not in free.token_ids[:i])
    pipe.model.cfg = pipe.model.cfg.replace(eos_token_ids=(free.token_ids[j],))
    kw = {"max_new_tokens": 24, "repetition_penalty": penalty}
    ends = pipe.generate(img, "caption en", min_new_tokens=j, **kw)
    assert (ends.token_ids, ends.finish_reason) == (free.token_ids[:j], "eos")
    goes_on = pipe.generate(img, "caption en", min_new_tokens=j + 1, **kw)
    assert goes_on.token_ids[:j] == free.token_ids[:j] and len(goes_on.token_ids) > j
    assert free.token_ids[j] not in goes_on.token_ids[j:j + 1]
