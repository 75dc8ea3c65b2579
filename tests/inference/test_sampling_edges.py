"""Sampling filters at their edges, where an off-by-one in a comparison changes which tokens can be drawn: ties at
the k-th logit, a nucleus total landing exactly on top_p, min_p = 1, and min_p after a temperature. Each edge is
checked against transformers' warpers (the reference semantics, see sampling.py)."""

import torch

from palitorch.inference.sampling import GenerationOptions, min_p_filter, sample, top_k_filter, top_p_filter, warp


def test_top_k_keeps_every_token_tied_with_the_kth_as_transformers_does():
    from transformers.generation.logits_process import TopKLogitsWarper

    logits = torch.tensor([[3.0, 2.0, 2.0, 2.0, 1.0, 0.5], [1.0, 1.0, 1.0, 1.0, 1.0, 1.0]])
    ours = top_k_filter(logits, 2)
    theirs = TopKLogitsWarper(2)(None, logits.clone())
    assert torch.equal(torch.isinf(ours), torch.isinf(theirs))
    assert torch.isfinite(ours[0]).tolist() == [True, True, True, True, False, False]
    assert torch.isfinite(ours[1]).all()  # a uniform row: every token ties with the k-th
    per_row = top_k_filter(logits, torch.tensor([[2], [2]]), 2)  # a live batch's per-row form
    assert torch.equal(per_row, ours)


def test_top_p_drops_a_tail_whose_total_is_exactly_one_minus_p():
    """Four equally likely tokens (probabilities exactly 0.25 in float32) and top_p = 0.75: the three most likely
    reach 0.75, so the nucleus has three, as transformers keeps (the tail's total, 0.25, is <= 1 - p)."""
    from transformers.generation.logits_process import TopPLogitsWarper

    logits = torch.zeros(1, 4)
    for p, kept in ((0.75, 3), (0.5, 2), (0.25, 1)):
        theirs = TopPLogitsWarper(p)(None, logits.clone())
        ours = top_p_filter(logits, p)
        assert int(torch.isfinite(ours).sum()) == int(torch.isfinite(theirs).sum()) == kept, p


def test_min_p_of_one_keeps_the_most_likely_token():
    """min_p = 1 (allowed: [0, 1]) keeps only the tokens as likely as the most likely one: sampling is then greedy,
    not a draw from an empty set (NaN probabilities, token 0)."""
    from transformers.generation.logits_process import MinPLogitsWarper

    logits = torch.tensor([[0.1, 2.0, -1.0, 0.7], [5.0, 1.0, 5.0, -3.0]])
    ours = min_p_filter(logits, 1.0)
    assert torch.equal(torch.isinf(ours), torch.isinf(MinPLogitsWarper(1.0)(None, logits.clone())))
    assert torch.isfinite(ours).tolist() == [[False, True, False, False], [True, False, True, False]]
    opts = GenerationOptions(min_p=1.0).validate()
    draws = sample(warp(logits[:1].expand(200, 4), opts), torch.Generator().manual_seed(0))
    assert (draws == 1).all()


def test_min_p_applies_to_the_distribution_after_the_temperature():
    """transformers' warpers run temperature first, then min-p on the tempered probabilities: a high temperature
    flattens the distribution, so more tokens pass the same min_p."""
    from transformers.generation.logits_process import MinPLogitsWarper, TemperatureLogitsWarper

    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0, -1.0]])
    for t in (0.5, 3.0):
        want = MinPLogitsWarper(0.2)(None, TemperatureLogitsWarper(t)(None, logits.clone()))
        got = warp(logits, GenerationOptions(temperature=t, min_p=0.2).validate())
        assert torch.equal(torch.isinf(got), torch.isinf(want)), t
        assert int(torch.isfinite(got).sum()) == {0.5: 1, 3.0: 5}[t]  # (2 at temperature 1)


def test_each_row_of_a_live_batch_samples_at_its_own_temperature():
    """RowChooser (a live batch's choice) divides each row's logits by that row's temperature: rows at 0.6 and 1.7
    draw from the two tempered distributions, and a greedy row beside them takes the largest logit."""
    from test_sampling import DRAWS, V, assert_matches, fixed_logits, renormalised

    from palitorch.inference.sampling import RowChooser

    logits = fixed_logits()
    n = DRAWS // 2
    opts = [GenerationOptions(temperature=0.6)] * n + [GenerationOptions(temperature=1.7)] * n + [GenerationOptions()]
    chooser = RowChooser(len(opts), V, [V - 1], "cpu")
    prompt = torch.zeros(len(opts), 1, dtype=torch.long)
    chooser.start(list(range(len(opts))), torch.arange(len(opts)), opts, prompt, torch.ones_like(prompt))
    torch.manual_seed(0)  # (a live batch's draws are unseeded: the global generator)
    got = chooser(logits.expand(len(opts), V), torch.zeros(len(opts), 1, dtype=torch.bool))
    everything = torch.ones(V, dtype=torch.bool)
    assert_matches(got[:n], renormalised(logits, everything, 0.6))
    assert_matches(got[n:2 * n], renormalised(logits, everything, 1.7))
    assert int(got[-1]) == int(logits.argmax())
