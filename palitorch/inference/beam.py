"""Beam search over the same cached prefill/advance steps as greedy decoding, as transformers' `generate` runs it.

Each prompt is prefilled once; its KV cache rows are then copied to `num_beams` rows, so the batch becomes B *
num_beams sequences (beams of one prompt are adjacent). Each step scores every (beam, token) continuation by its
beam's summed log-probability, with the repetition penalty and min_new_tokens applied to the normalised log-probs
(not renormalised, as transformers does), and keeps the best K = max(2, 1 + #EOS ids) * num_beams per prompt. Of
those, the ones among the best num_beams that end (an EOS, a stop string, or the last step) join the prompt's
finished hypotheses, of which the best num_beams are kept, each scoring `sum(logprob) / length ** length_penalty`
(its length counting the EOS); the best num_beams that do not end continue. A prompt's Result is its best
hypothesis, with all of them, best first, in `Result.beams` (transformers' num_return_sequences). A prompt is done
when it has num_beams finished hypotheses and, unless `early_stopping` is True, its best running beam could not beat
the worst of them at its current length (`early_stopping=False`, transformers' default) or at max_new_tokens
(`"never"`, with a positive length penalty). num_beams=1 is greedy decoding. Beam search syncs with the host every
step; it is not the fast path.

Axes: B prompts, M beams per prompt, V vocab.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch

from palitorch.inference.answer import Alternatives, Answer, Result, alternatives_lists, top_alternatives
from palitorch.inference.caches import ensure_caches, keep_caches, use_caches
from palitorch.inference.generate import EAGER, Prompts, Steps, advance, check_finite, prefill
from palitorch.inference.logprobs import raw_logprobs
from palitorch.inference.processor import Processor
from palitorch.inference.sampling import Chooser, GenerationOptions
from palitorch.model import PaliGemma


@dataclass
class Hypothesis:
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)  # raw log-probs, as Result reports them
    alternatives: list[Alternatives] = field(default_factory=list)  # with top_logprobs: each step's, as Result's


def expand_caches(model: PaliGemma, beams: int, pool: dict | None = None) -> None:
    """Give the model other caches with every row of its current ones repeated `beams` times: row b becomes rows
    b * beams ... b * beams + beams - 1. Other cache objects: the old ones may be a live batch's (its pool), which
    must keep their shape. `pool`: as for `ensure_caches` (CUDA graphs), which keeps the beams' caches too."""
    layers = model.language_model.layers
    old = [layer.attn.kv_cache for layer in layers]
    b, _, s, _ = old[0].k.shape
    if pool is not None and (b * beams, s) in pool:
        use_caches(model, pool, (b * beams, s))
    else:
        with torch.inference_mode(False):  # ordinary tensors, as `ensure_caches` allocates them
            model.setup_caches(b * beams, s, old[0].k.dtype, old[0].k.device)
        if pool is not None:
            keep_caches(model, pool)
    for layer, c in zip(layers, old):
        layer.attn.kv_cache.k.copy_(c.k.repeat_interleave(beams, 0))
        layer.attn.kv_cache.v.copy_(c.v.repeat_interleave(beams, 0))


def reorder_caches(model: PaliGemma, rows: torch.Tensor) -> None:
    """Make cache row i a copy of row rows[i] (the beam each survivor continues)."""
    for layer in model.language_model.layers:
        c = layer.attn.kv_cache
        c.k.copy_(c.k.index_select(0, rows))
        c.v.copy_(c.v.index_select(0, rows))


@torch.inference_mode()
def beam_search(model: PaliGemma, processor: Processor, prompts: Prompts, opts: GenerationOptions,
                eos: list[int], steps: int, fns: Steps | None = None) -> list[Result]:
    b, t = prompts.ids.shape
    m = opts.num_beams
    pool, compiled = (fns or EAGER).caches, (fns or EAGER).compiled
    logits, cur = prefill(model, prompts, ensure_caches(model, b, t + steps, pool, compiled))
    expand_caches(model, m, pool)
    rows = torch.arange(b, device=logits.device).repeat_interleave(m)
    for name in ("valid", "pos"):
        setattr(cur, name, getattr(cur, name)[rows])
    ids, valid = prompts.ids[rows], prompts.valid[rows]
    chooser = Chooser(opts, eos, logits.shape[-1], ids, valid)
    logits = logits[rows]
    v = logits.shape[-1]
    eos_set = set(eos)
    k = max(2, 1 + len(eos_set)) * m  # candidates kept per prompt: enough to leave m that do not end

    # Only the first beam of each prompt is live at the start, so the first step does not pick M copies.
    scores = torch.full((b, m), float("-inf"), device=logits.device)
    scores[:, 0] = 0.0
    beams = [[Hypothesis() for _ in range(m)] for _ in range(b)]
    finished: list[list[tuple[float, Hypothesis, str]]] = [[] for _ in range(b)]  # (score, hypothesis, reason)
    done = [False] * b
    for i in range(steps):
        raw = raw_logprobs(logits)
        processed = chooser.process(raw, i)  # [B*M, V]
        cand = (scores[..., None] + processed.view(b, m, v)).view(b, m * v)
        top, idx = cand.topk(min(k, m * v), dim=-1)  # [B, K]
        src, tok = idx // v, idx % v
        raw_top = raw.view(b, m, v)[torch.arange(b, device=raw.device)[:, None], src, tok]
        top_l, src_l, tok_l, raw_l = top.tolist(), src.tolist(), tok.tolist(), raw_top.tolist()
        alts = alternatives_lists(*top_alternatives(raw, opts.top_logprobs)) if opts.top_logprobs else None
        last, length = i + 1 == steps, i + 1

        next_src, next_tok, next_score = [], [], []
        for p in range(b):
            children = [_grow(beams[p][src], token, lp, alts[p * m + src] if alts else None)
                        for src, token, lp in zip(src_l[p], tok_l[p], raw_l[p])]
            kept = []
            full = opts.early_stopping is True and len(finished[p]) >= m  # (as the step began: all its endings join)
            for rank, (score, token, child) in enumerate(zip(top_l[p], tok_l[p], children)):
                ends = token in eos_set or last or (bool(opts.stop) and _stops(processor, child, opts.stop))
                if not ends:
                    if score > float("-inf") and len(kept) < m:
                        kept.append(rank)
                elif rank < m and score > float("-inf") and not done[p] and not full:
                    hyp = beams[p][src_l[p][rank]] if token in eos_set else child  # (an EOS is not text)
                    finished[p].append((score / length**opts.length_penalty, hyp, "eos" if token in eos_set
                                        else "length"))
            finished[p] = sorted(finished[p], key=lambda f: -f[0])[:m]
            best = top_l[p][kept[0]] if kept else float("-inf")
            if len(finished[p]) >= m and not done[p]:  # could the best running beam still beat the worst finished?
                reach = steps if opts.early_stopping == "never" and opts.length_penalty > 0 else length
                done[p] = best / reach**opts.length_penalty <= finished[p][-1][0]
            fillers = m - len(kept)  # (when under M continuations remain: dead beams that never win)
            beams[p] = [children[rank] for rank in kept] + [Hypothesis() for _ in range(fillers)]
            next_src += [p * m + src_l[p][rank] for rank in kept] + [p * m] * fillers
            next_tok += [tok_l[p][rank] for rank in kept] + [eos[0]] * fillers
            next_score += [top_l[p][rank] for rank in kept] + [float("-inf")] * fillers
        if last or all(done) or (opts.early_stopping is True and all(len(f) >= m for f in finished)):
            break
        device = logits.device
        order = torch.tensor(next_src, device=device)
        tokens = torch.tensor(next_tok, device=device)
        scores = torch.tensor(next_score, device=device).view(b, m)
        reorder_caches(model, order)
        if chooser.seen is not None:
            chooser.seen = chooser.seen[order]
        chooser.observe(tokens)
        logits = advance(model, cur, tokens, fns)
        check_finite(logits)  # (NaN scores would end every beam: an empty answer; beams sync every step anyway)

    results = []
    for p in range(b):
        ranked = finished[p] or [(float("-inf"), Hypothesis(), "length")]  # (none with a finite score)
        beams = [_result(processor, eos, opts, prompts.lengths[p], *kept) for kept in ranked]
        results.append(dataclasses.replace(beams[0], beams=beams))
    return results


def _result(processor: Processor, eos: list[int], opts: GenerationOptions, prompt_tokens: int, score: float,
            hyp: Hypothesis, reason: str) -> Result:
    """A finished hypothesis as a Result (text, finish reason; `beam_score` its score)."""
    answer = Answer(processor, eos, opts.stop, prompt_tokens, top=opts.top_logprobs > 0)
    alternatives = hyp.alternatives or [None] * len(hyp.tokens)
    for tok, lp, alt in zip(hyp.tokens, hyp.logprobs, alternatives):
        answer.push(tok, lp, track_text=bool(opts.stop), alternatives=alt)
    if answer.finish is None and reason == "eos":
        answer.finish = "eos"
    return dataclasses.replace(answer.result(), beam_score=score)


def _grow(hyp: Hypothesis, token: int, logprob: float, alternatives: Alternatives | None) -> Hypothesis:
    """`hyp` continued by one token (with that step's alternatives from the parent beam's distribution, if kept)."""
    return Hypothesis(hyp.tokens + [token], hyp.logprobs + [logprob],
                      hyp.alternatives + ([alternatives] if alternatives is not None else []))


def _stops(processor: Processor, hyp: Hypothesis, stop: list[str]) -> bool:
    """Whether a hypothesis's text holds a stop string (it did not before its last token, or it would have ended)."""
    text = processor.decode(hyp.tokens)
    return any(s in text for s in stop)
