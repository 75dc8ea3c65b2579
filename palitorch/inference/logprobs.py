"""The log-probabilities an answer reports: log_softmax of the model's raw logits (before any sampling warper or
penalty) at the chosen tokens, and at a step's most likely tokens (top_logprobs), computed on the device."""

from __future__ import annotations

import torch

from palitorch.inference.answer import Top, top_alternatives


def raw_logprobs(logits: torch.Tensor) -> torch.Tensor:
    """log_softmax of the unprocessed logits [B, V], in float32: what `Result.logprobs` reports."""
    return torch.log_softmax(logits.float(), dim=-1)


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """`raw_logprobs(logits)` at tokens [B] -> [B]. On a GPU as logit - logsumexp: CUDA's log_softmax runs a row on
    one thread block, 56 us for a 257k vocabulary on an H200 at batch 1, where a reduction spreads over the card.
    On CPU log_softmax itself: there torch's logsumexp is a chain of small ops (56 vs 19 us for the bundled model's
    1,543-entry vocabulary, ~40 us a decode step, measured)."""
    if logits.device.type == "cpu":
        return raw_logprobs(logits).gather(-1, tokens[:, None])[:, 0]
    return logsumexp_logprobs(logits.float(), tokens)


def chosen_logprobs(logits: torch.Tensor, tokens: torch.Tensor, k: int = 0) -> tuple[torch.Tensor, Top | None]:
    """`token_logprobs`, and with k > 0 (top_logprobs) the step's k most likely tokens too, both from one
    log_softmax of the raw logits -> (logprobs [B], alternatives or None)."""
    if not k:
        return token_logprobs(logits, tokens), None
    raw = raw_logprobs(logits)
    return raw.gather(-1, tokens[:, None])[:, 0], top_alternatives(raw, k)


def logsumexp_logprobs(x: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log_softmax(x)[tokens] for float32 x [B, V], tokens [B], as x[tokens] - logsumexp(x): no [B, V] output."""
    return x.gather(-1, tokens[:, None])[:, 0] - torch.logsumexp(x, dim=-1)
