"""Beam search's stopping rules on hand-made bigram language models, against transformers' generate: a case where
early_stopping="never" finds a longer, better answer that False (transformers' default heuristic) stops before, one
where the best running beam ties the worst finished hypothesis (False stops then), and random peaked tables where
an ending candidate ranks just past num_beams or two EOS ids take most of the candidates.

The model is a table of next-token log-probabilities by last token; palitorch's beam search runs over it through
its prefill / advance / cache steps, replaced here by the table, transformers' through a PreTrainedModel returning
the table's rows. Tolerances: tokens equal; scores within 1e-4.
"""

import types

import pytest
import torch

from palitorch.inference import beam
from palitorch.inference.generate import Prompts
from palitorch.inference.sampling import GenerationOptions

V, EOS, A, B, C, D = 6, 1, 2, 3, 4, 5


def bigram() -> torch.Tensor:
    """[V, V] log-probabilities of the next token given the last (token 0 is the prompt). After the prompt: EOS
    0.5, A 0.3, B 0.2; B is always followed by EOS; A by EOS 0.55 or C 0.45; C repeats itself almost surely. With
    two beams and length penalty 1, after two steps the finished "" (-0.69) and "B" (-0.80) beat the running "AC"
    at its length (-2.0 / 2), but not at max_new_tokens (-2.0 / 6), and "ACCCCC" ends at about -0.33."""
    p = torch.full((V, V), 1e-6)
    p[0, [EOS, A, B]] = torch.tensor([0.5, 0.3, 0.2])
    p[A, [EOS, C]] = torch.tensor([0.55, 0.45])
    p[B, EOS] = p[EOS, EOS] = 1.0
    p[C, C], p[C, EOS] = 0.999, 0.001
    return (p / p.sum(-1, keepdim=True)).log()


def tie() -> torch.Tensor:
    """After the prompt: EOS 0.5, A 0.4, B 0.1; A is followed by EOS or C, equally likely, B by D; C repeats itself
    almost surely. With two beams and length penalty 1, after two steps the running "AC" scores exactly what the
    finished "A" does, the worst of the two finished: False stops there, though "ACCCCC" would have won."""
    p = torch.full((V, V), 1e-6)
    p[0, [EOS, A, B]] = torch.tensor([0.5, 0.4, 0.1])
    p[A, [EOS, C]] = 0.5
    p[B, D] = p[D, D] = p[EOS, EOS] = 1.0
    p[C, C], p[C, EOS] = 0.999, 0.001
    return (p / p.sum(-1, keepdim=True)).log()


def palitorch_beams(monkeypatch, table, steps, eos=(EOS,), **kw):
    """palitorch's beam search over the table: each cache row holds its sequence's tokens."""
    rows = [[0]]

    def prefill(model, prompts, s_len):
        return table[[0]].clone(), types.SimpleNamespace(valid=torch.ones(1, 1, dtype=torch.bool),
                                                         pos=torch.zeros(1, 1, dtype=torch.long))

    def expand_caches(model, m, pool=None):
        rows[:] = [list(rows[0]) for _ in range(m)]

    def reorder_caches(model, order):
        rows[:] = [list(rows[r]) for r in order.tolist()]

    def advance(model, cur, tokens, fns=None):
        for row, t in zip(rows, tokens.tolist()):
            row.append(t)
        return table[[row[-1] for row in rows]].clone()

    for name, fn in dict(prefill=prefill, advance=advance, expand_caches=expand_caches,
                         reorder_caches=reorder_caches, ensure_caches=lambda *a: None).items():
        monkeypatch.setattr(beam, name, fn)
    processor = types.SimpleNamespace(decode=lambda ids: "".join(chr(ord("a") + i) for i in ids),
                                      is_byte=lambda t: False, is_hidden=lambda t: False)
    opts = GenerationOptions(max_new_tokens=steps, **kw).validate()
    prompts = Prompts(ids=torch.zeros(1, 1, dtype=torch.long), valid=torch.ones(1, 1, dtype=torch.bool),
                      pixels=None, lengths=[1])
    result = beam.beam_search(None, processor, prompts, opts, list(eos), steps)[0]
    return [(b.token_ids, b.finish_reason, b.beam_score) for b in result.beams]


def transformers_beams(table, steps, eos=(EOS,), **kw):
    """transformers' generate over the same table: (tokens before the first EOS, finish reason, score) per beam."""
    from transformers import GenerationMixin, PretrainedConfig, PreTrainedModel
    from transformers.modeling_outputs import CausalLMOutputWithPast

    class Table(PreTrainedModel, GenerationMixin):
        config_class = PretrainedConfig

        def __init__(self, config):
            super().__init__(config)
            self.table = torch.nn.Parameter(table.clone())

        def forward(self, input_ids=None, attention_mask=None, **_):
            return CausalLMOutputWithPast(logits=self.table[input_ids])

    model = Table(PretrainedConfig(vocab_size=V)).eval()
    ids = torch.zeros(1, 1, dtype=torch.long)
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=steps, do_sample=False,
                         eos_token_id=list(eos), pad_token_id=eos[0], use_cache=False, return_dict_in_generate=True,
                         output_scores=True, num_return_sequences=kw["num_beams"], **kw)
    beams = []
    for seq, score in zip(out.sequences[:, 1:].tolist(), out.sequences_scores.tolist()):
        end = next((j for j, t in enumerate(seq) if t in eos), None)
        beams.append((seq[:end], "eos" if end is not None else "length", score))
    return beams


@pytest.mark.parametrize("early_stopping", [False, True, "never"])
def test_never_searches_on_while_a_longer_answer_could_still_win(monkeypatch, early_stopping):
    kw = dict(num_beams=2, length_penalty=1.0, early_stopping=early_stopping)
    table = bigram()
    want = transformers_beams(table, 6, **kw)
    got = palitorch_beams(monkeypatch, table, 6, **kw)
    assert [(t, r) for t, r, _ in got] == [(t, r) for t, r, _ in want]
    assert [s for *_, s in got] == pytest.approx([s for *_, s in want], abs=1e-4)
    # the case is one where the rules differ: "never" keeps "AC" going and it wins
    assert (got[0][0] == [A] + [C] * 5) == (early_stopping == "never")


def test_a_running_beam_that_ties_the_worst_finished_one_ends_the_search(monkeypatch):
    kw = dict(num_beams=2, length_penalty=1.0, early_stopping=False)
    want = transformers_beams(tie(), 6, **kw)
    got = palitorch_beams(monkeypatch, tie(), 6, **kw)
    assert [(t, r) for t, r, _ in got] == [(t, r) for t, r, _ in want] == [([], "eos"), ([A], "eos")]
    assert [s for *_, s in got] == pytest.approx([s for *_, s in want], abs=1e-4)


@pytest.mark.parametrize("seed, eos, kw", [
    (1, (EOS,), dict(num_beams=3, length_penalty=-1.0, early_stopping=False)),  # an EOS ranked num_beams-th
    (12, (EOS, A), dict(num_beams=2, length_penalty=2.0, early_stopping="never")),  # 2 EOS ids: 3 * beams kept
])
def test_random_peaked_tables_as_transformers(monkeypatch, seed, eos, kw):
    table = (torch.randn(V, V, generator=torch.Generator().manual_seed(seed)) * 3).log_softmax(-1)
    want = transformers_beams(table, 5, eos, **kw)
    got = palitorch_beams(monkeypatch, table, 5, eos, **kw)
    assert [(t, r) for t, r, _ in got] == [(t, r) for t, r, _ in want]
    assert [s for *_, s in got] == pytest.approx([s for *_, s in want], abs=1e-4)
