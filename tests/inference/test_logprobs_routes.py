"""A bfloat16 model's logprobs and top alternatives, normalised in float32, and DoneWatch's policy on devices other
than CPU and CUDA. (Both routes of a chosen token's logprob, log_softmax and logit - logsumexp, are compared in
test_fast_attention.py.)

Tolerances: logprobs within 1e-5 of float32 log_softmax (only the summation order differs).
"""

import torch

from palitorch.inference import logprobs
from palitorch.inference.done import DoneWatch


def _logits(dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    return (torch.randn(3, 1543, generator=g) * 8).to(dtype), torch.tensor([0, 777, 1542])


def test_bfloat16_logits_are_normalised_in_float32():
    """A bfloat16 model's logits: the logprobs are those of the same values in float32, not bfloat16's rounding of
    a bfloat16 log_softmax (which is off by up to ~2^-8 of the value)."""
    x, tokens = _logits(torch.bfloat16)
    want = torch.log_softmax(x.float(), -1).gather(-1, tokens[:, None])[:, 0]
    got = logprobs.token_logprobs(x, tokens)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    raw, (ids, values) = logprobs.chosen_logprobs(x, tokens, k=2)
    torch.testing.assert_close(raw, want, rtol=0, atol=1e-5)
    top_values, top_ids = torch.log_softmax(x.float(), -1).topk(2, dim=-1)
    assert torch.equal(ids, top_ids)
    torch.testing.assert_close(values, top_values, rtol=0, atol=1e-5)


def test_on_other_devices_done_is_read_every_eighth_step():
    """Neither CPU nor CUDA (an MPS device, say): a blocking read after steps 7, 15, 23, ... only."""
    watch = DoneWatch(torch.device("meta"))
    done = torch.tensor([True, True])
    assert [s for s in range(24) if watch.finished(done, s)] == [7, 15, 23]
    assert not watch.finished(torch.tensor([True, False]), 7)
