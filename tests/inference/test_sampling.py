"""Decoding options and the sampling filters: validation, agreement with transformers' warpers, and statistics.

Statistical tests draw 20,000 samples from a fixed logits vector with a fixed seed and apply Pearson's chi-square
test at significance 0.001 (critical value by the Wilson-Hilferty approximation), bins with fewer than 5 expected
draws merged. Filter masks must equal transformers' exactly.
"""

import math

import pytest
import torch

from palitorch.errors import InputError
from palitorch.inference.sampling import (
    Chooser,
    GenerationOptions,
    RowChooser,
    min_p_filter,
    penalize_repeats,
    sample,
    tail_column,
    top_k_filter,
    top_p_filter,
    warp,
)

V, DRAWS = 40, 20_000


def fixed_logits() -> torch.Tensor:
    return torch.randn(V, generator=torch.Generator().manual_seed(0)) * 2.0


def draw(logits: torch.Tensor, seed: int = 0, **opts) -> torch.Tensor:
    """DRAWS samples from one logits vector [V] with the given options -> token ids [DRAWS]."""
    o = GenerationOptions(**opts).validate()
    assert o.do_sample
    g = torch.Generator().manual_seed(seed)
    return sample(warp(logits.expand(DRAWS, V), o), g)


def chi2_critical(df: int, z: float = 3.09) -> float:
    """Upper critical value of chi-square with df degrees of freedom at the level whose normal quantile is z."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def assert_matches(samples: torch.Tensor, probs: torch.Tensor) -> None:
    """Chi-square goodness of fit of `samples` to `probs` [V] (which must sum to 1), over tokens with p > 0."""
    counts = torch.bincount(samples, minlength=V).double()
    expected = probs.double() * len(samples)
    order = torch.argsort(expected, descending=True)
    obs, exp = counts[order], expected[order]
    keep = exp >= 5
    obs = torch.cat([obs[keep], obs[~keep].sum(0, keepdim=True)])
    exp = torch.cat([exp[keep], exp[~keep].sum(0, keepdim=True)])
    if exp[-1] < 5:  # merge the small tail into the last kept bin
        obs, exp = torch.cat([obs[:-2], obs[-2:].sum(0, keepdim=True)]), torch.cat([exp[:-2], exp[-2:].sum(0, keepdim=True)])  # noqa: E501
    stat = float(((obs - exp) ** 2 / exp).sum())
    df = len(exp) - 1
    assert df >= 2, "the test needs several bins to mean anything"
    assert stat < chi2_critical(df), f"chi-square {stat:.1f} over {df} degrees of freedom"


def renormalised(logits: torch.Tensor, allowed: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    p = torch.softmax(logits.double() / temperature, -1) * allowed
    return p / p.sum()


def reference_nucleus(logits: torch.Tensor, p: float) -> torch.Tensor:
    """The smallest most-probable set of tokens whose total probability reaches p, written out plainly."""
    probs = torch.softmax(logits.double(), -1)
    allowed = torch.zeros(V, dtype=torch.bool)
    total = 0.0
    for i in torch.argsort(probs, descending=True).tolist():
        allowed[i] = True
        total += float(probs[i])
        if total >= p:
            break
    return allowed


# ------------------------------------------------------------------------------------------ statistics


def test_plain_sampling_matches_softmax():
    logits = fixed_logits()
    assert_matches(draw(logits, temperature=1.0), renormalised(logits, torch.ones(V, dtype=torch.bool)))


def test_temperature_matches_scaled_softmax():
    logits = fixed_logits()
    s = draw(logits, temperature=0.6)
    assert_matches(s, renormalised(logits, torch.ones(V, dtype=torch.bool), 0.6))


def test_top_k_stays_in_set_and_matches():
    logits = fixed_logits()
    allowed = torch.zeros(V, dtype=torch.bool)
    allowed[torch.topk(logits, 6).indices] = True
    s = draw(logits, top_k=6)
    assert allowed[s].all()
    assert len(s.unique()) == 6
    assert_matches(s, renormalised(logits, allowed))


def test_top_p_stays_in_set_and_matches():
    logits = fixed_logits()
    allowed = reference_nucleus(logits, 0.8)
    assert 3 <= int(allowed.sum()) < V - 5
    s = draw(logits, top_p=0.8)
    assert allowed[s].all()
    assert_matches(s, renormalised(logits, allowed))


def test_min_p_stays_in_set_and_matches():
    logits = fixed_logits()
    probs = torch.softmax(logits, -1)
    allowed = probs >= 0.05 * probs.max()
    assert 3 <= int(allowed.sum()) < V - 5
    s = draw(logits, min_p=0.05)
    assert allowed[s].all()
    assert_matches(s, renormalised(logits, allowed))


def test_filters_compose_in_order():
    """temperature, then top-k, then top-p on the top-k distribution."""
    logits = fixed_logits()
    t = 1.3
    allowed = torch.zeros(V, dtype=torch.bool)
    allowed[torch.topk(logits, 10).indices] = True
    kept = logits.masked_fill(~allowed, float("-inf")) / t
    allowed = reference_nucleus(kept, 0.7)
    s = draw(logits, temperature=t, top_k=10, top_p=0.7)
    assert allowed[s].all()
    assert_matches(s, renormalised(logits, allowed, t))


def test_same_seed_same_sample_other_seed_other_sample():
    logits = fixed_logits()
    a, b, c = draw(logits, seed=7, top_k=20), draw(logits, seed=7, top_k=20), draw(logits, seed=8, top_k=20)
    assert torch.equal(a, b) and not torch.equal(a, c)


# ------------------------------------------------------------------------------------------ agreement with transformers


@pytest.mark.parametrize("seed", range(5))
def test_filters_equal_transformers_warpers(seed):
    from transformers.generation.logits_process import (
        MinPLogitsWarper,
        RepetitionPenaltyLogitsProcessor,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(4, 300, generator=g) * 3
    ids = torch.randint(0, 300, (4, 12), generator=g)
    for ours, theirs in (
        (top_k_filter(logits, 17), TopKLogitsWarper(17)(ids, logits.clone())),
        (top_p_filter(logits, 0.9), TopPLogitsWarper(0.9)(ids, logits.clone())),
        (min_p_filter(logits, 0.1), MinPLogitsWarper(0.1)(ids, logits.clone())),
    ):
        assert torch.equal(torch.isinf(ours), torch.isinf(theirs))
        torch.testing.assert_close(ours[~torch.isinf(ours)], theirs[~torch.isinf(theirs)], rtol=0, atol=0)
    seen = torch.zeros(4, 300, dtype=torch.bool).scatter_(1, ids, True)
    torch.testing.assert_close(penalize_repeats(logits, seen, 1.3),
                               RepetitionPenaltyLogitsProcessor(1.3)(ids, logits.clone()), rtol=0, atol=1e-6)


def test_top_p_keeps_transformers_tokens_among_ties():
    """bfloat16 logits are full of ties: where the nucleus ends inside a run of equal logits, the same tokens are
    kept as transformers keeps (an audit found 132 of 7532 differing when palitorch sorted the other way)."""
    from transformers.generation.logits_process import TopPLogitsWarper

    g = torch.Generator().manual_seed(0)
    logits = (15 + torch.randn(3, 32000, generator=g) * 0.3).bfloat16().float()
    for p in (0.5, 0.9, 0.99):
        ours = top_p_filter(logits, p)
        assert torch.equal(torch.isinf(ours), torch.isinf(TopPLogitsWarper(p)(None, logits.clone()))), p
        per_row = top_p_filter(logits, tail_column([p] * 3, "cpu"))
        assert torch.equal(torch.isinf(per_row), torch.isinf(ours)), p
    # A token whose probability from the bottom lands between 1 - 0.9 in float64 and in float32 (0.100000024): the
    # per-row form (a live batch's) makes 1 - p on the host, as transformers' Python float is.
    edges = [torch.tensor([[math.log(0.1) + k * 2e-8, math.log(0.9)]]) for k in range(200)]
    for x in edges:
        want = torch.isinf(TopPLogitsWarper(0.9)(None, x.clone()))
        assert torch.equal(torch.isinf(top_p_filter(x, tail_column([0.9], "cpu"))), want)
        assert torch.equal(torch.isinf(top_p_filter(x, 0.9)), want)


def test_chooser_suppresses_eos_until_min_new_tokens_and_counts_the_prompt_as_seen():
    logits = torch.zeros(2, 10)
    logits[:, 1] = 5.0  # EOS (id 1) is the favourite, then 4, then 5
    logits[:, 4] = 4.0
    logits[:, 5] = 3.0
    prompt = torch.tensor([[0, 4, 6], [7, 7, 6]])
    valid = torch.tensor([[False, True, True], [True, True, True]])
    c = Chooser(GenerationOptions(min_new_tokens=2, repetition_penalty=2.0), [1], 10, prompt, valid)
    # Row 0 saw 4 in its prompt (4.0 / 2 = 2.0 < 3.0); row 1 did not. EOS is suppressed before step 2.
    assert c(logits, 0).tolist() == [5, 4]
    assert c(logits, 2).tolist() == [1, 1]
    assert not bool(c.seen[0, 0]), "left padding (id 0 at an invalid position) is not a seen token"
    c.observe(torch.tensor([5, 5]))
    assert c(logits, 1).tolist() == [4, 4]  # row 0: 5 is seen now too (1.5), below 4 (2.0)


# ------------------------------------------------------------------------------------------ options


def test_greedy_unless_asked_to_sample():
    assert not GenerationOptions().do_sample
    assert not GenerationOptions(temperature=0).do_sample
    assert not GenerationOptions(temperature=0, top_k=5).do_sample
    assert GenerationOptions(top_p=0.9).do_sample and GenerationOptions(min_p=0.1).do_sample
    assert GenerationOptions(temperature=0.7).do_sample


@pytest.mark.parametrize("kw", [
    {"max_new_tokens": 0}, {"max_new_tokens": 2.5}, {"min_new_tokens": -1}, {"temperature": -0.1},
    {"top_k": 0}, {"top_p": 0}, {"top_p": 1.2}, {"min_p": -0.1}, {"min_p": 1.01}, {"num_beams": 0},
    {"repetition_penalty": 0}, {"temperature": float("nan")}, {"seed": "x"}, {"stop": "a"}, {"stop": [""]},
    {"num_beams": 2, "temperature": 0.5}, {"max_new_tokens": True}, {"seed": 2**64}, {"seed": -(2**63) - 1},
    {"length_penalty": 1e308}, {"length_penalty": -21}, {"num_beams": 129},
])
def test_invalid_options_raise_input_error(kw):
    with pytest.raises(InputError) as e:
        GenerationOptions(**kw).validate()
    assert "\n" not in str(e.value) and str(e.value)


def test_extreme_temperatures_top_p_and_penalties_give_tokens_not_nan():
    """Values the options allow but float32 cannot hold (a temperature or top_p below its smallest normal number,
    logits divided into +inf): a temperature near 0 samples the greedy token, a top_p near 0 keeps the likeliest
    token, and no NaN turns into token 0. Per row (a live batch's RowChooser) as well as for a whole batch."""
    one = fixed_logits() * 10
    for t in (1e-300, 1e-40, 1e-30):
        assert (draw(one, temperature=t) == one.argmax()).all()
    for p in (1e-300, 1e-45):
        assert (draw(one, top_p=p) == one.argmax()).all()
    logits = one[None].repeat(3, 1)
    greedy = logits.argmax(-1)
    chooser = RowChooser(3, V, [0], "cpu")
    opts = [GenerationOptions(temperature=1e-300), GenerationOptions(top_p=1e-300), GenerationOptions()]
    chooser.start([0, 1, 2], torch.arange(3), opts, torch.zeros(3, 1, dtype=torch.long), torch.ones(3, 1))
    assert torch.equal(chooser(logits, torch.zeros(3, 1, dtype=torch.bool)), greedy)
    x = penalize_repeats(logits, torch.ones_like(logits, dtype=torch.bool), 1e-300)
    assert not torch.isnan(x.softmax(-1)).any() and torch.isfinite(x.amax(-1)).all()


def test_numpy_numbers_are_taken_as_python_numbers():
    import numpy as np

    o = GenerationOptions.from_kwargs(temperature=np.float32(0.5), top_p=np.float64(0.9), max_new_tokens=np.int64(3))
    assert (o.temperature, o.top_p, o.max_new_tokens) == (0.5, 0.9, 3)
    assert type(o.temperature) is float and type(o.max_new_tokens) is int
    with pytest.raises(InputError, match="temperature"):
        GenerationOptions.from_kwargs(temperature=np.float32("nan"))


@pytest.mark.parametrize("seed", [-(2**63), -1, 0, 2**64 - 1])
def test_every_seed_torch_takes_is_accepted(seed):
    opts = GenerationOptions(seed=seed, temperature=1.0).validate()
    torch.Generator().manual_seed(opts.seed)


def test_early_stopping_null_is_the_default_and_never_is_any_case():
    assert GenerationOptions.from_kwargs(early_stopping=None).early_stopping is False  # (JSON null)
    assert GenerationOptions.from_kwargs(early_stopping="Never").early_stopping == "never"
    with pytest.raises(InputError, match='early_stopping must be true, false or "never"'):
        GenerationOptions.from_kwargs(early_stopping="sometimes")


def test_from_kwargs_accepts_a_single_stop_string_and_rejects_unknown_names():
    assert GenerationOptions.from_kwargs(stop="\n").stop == ["\n"]
    with pytest.raises(InputError, match="unknown decoding option 'topk'"):
        GenerationOptions.from_kwargs(topk=3)
    base = GenerationOptions(max_new_tokens=5)
    assert GenerationOptions.from_kwargs(base, top_k=3) == GenerationOptions(max_new_tokens=5, top_k=3)
    assert base.top_k is None


def test_per_row_filters_equal_the_scalar_filter_on_each_row():
    """top-k, top-p and min-p with one setting per row ([B, 1] tensors, as continuous batching uses them) give
    each row what the scalar filter gives it; a row with top_p = 1 is left as it is."""
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(0)) * 3
    ks, ps, mins = [1, 5, 50, 80], [0.05, 0.5, 0.9, 1.0], [0.0, 0.1, 0.5, 1.0]
    got = top_k_filter(logits, torch.tensor(ks)[:, None], max(ks))
    assert torch.equal(got, torch.cat([top_k_filter(logits[i:i + 1], k) for i, k in enumerate(ks)]))
    got = top_p_filter(logits, tail_column(ps, "cpu"))
    assert torch.equal(got, torch.cat([top_p_filter(logits[i:i + 1], p) for i, p in enumerate(ps)]))
    assert torch.equal(got[3], logits[3])
    got = min_p_filter(logits, torch.tensor(mins)[:, None])
    assert torch.equal(got, torch.cat([min_p_filter(logits[i:i + 1], m) for i, m in enumerate(mins)]))
