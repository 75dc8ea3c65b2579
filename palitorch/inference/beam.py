"""Beam search over the same cached prefill/advance steps as greedy decoding.

Each prompt is prefilled once; its KV cache rows are then copied to `num_beams` rows, so the batch becomes
B * num_beams sequences (beams of one prompt are adjacent). Each step scores every (beam, token) continuation by
its beam's summed log-probability (of the processed distribution: repetition penalty and min_new_tokens applied),
keeps the best 2 * num_beams per prompt, retires those that end in EOS as finished hypotheses, and continues with
the best num_beams that do not. A finished hypothesis scores `sum(logprob) / length ** length_penalty`, its length
counting the EOS. A prompt stops as soon as it has num_beams finished hypotheses (transformers' early_stopping=True),
so num_beams=1 is exactly greedy decoding. Beam search syncs with the host every step; it is not the fast path.

Axes: B prompts, M beams per prompt, V vocab.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from palitorch.inference.answer import Alternatives, Answer, Result, alternatives_lists, top_alternatives
from palitorch.inference.generate import Prompts, Steps, advance, ensure_caches, prefill, raw_logprobs
from palitorch.inference.processor import Processor
from palitorch.inference.sampling import Chooser, GenerationOptions
from palitorch.model import PaliGemma


@dataclass
class Hypothesis:
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)  # raw log-probs, as Result reports them
    alternatives: list[Alternatives] = field(default_factory=list)  # with top_logprobs: each step's, as Result's


def expand_caches(model: PaliGemma, beams: int) -> None:
    """Give the model new caches with every row of its current ones repeated `beams` times: row b becomes rows
    b * beams ... b * beams + beams - 1. New cache objects: the old ones may be a live batch's (its pool), which
    must keep their shape."""
    layers = model.language_model.layers
    old = [layer.attn.kv_cache for layer in layers]
    b, _, s, _ = old[0].k.shape
    with torch.inference_mode(False):  # ordinary tensors, as `ensure_caches` allocates them
        model.setup_caches(b * beams, s, old[0].k.dtype, old[0].k.device)
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
    logits, cur = prefill(model, prompts, ensure_caches(model, b, t + steps))
    expand_caches(model, m)
    rows = torch.arange(b, device=logits.device).repeat_interleave(m)
    for name in ("valid", "pos"):
        setattr(cur, name, getattr(cur, name)[rows])
    ids, valid = prompts.ids[rows], prompts.valid[rows]
    chooser = Chooser(opts, eos, logits.shape[-1], ids, valid)
    logits = logits[rows]
    v = logits.shape[-1]
    eos_set = set(eos)

    # Only the first beam of each prompt is live at the start, so the first step does not pick M copies.
    scores = torch.full((b, m), float("-inf"), device=logits.device)
    scores[:, 0] = 0.0
    beams = [[Hypothesis() for _ in range(m)] for _ in range(b)]
    finished: list[list[tuple[float, Hypothesis, str]]] = [[] for _ in range(b)]
    for i in range(steps):
        processed = torch.log_softmax(chooser.process(logits, i), dim=-1)  # [B*M, V]
        raw = raw_logprobs(logits)
        cand = (scores[..., None] + processed.view(b, m, v)).view(b, m * v)
        top, idx = cand.topk(2 * m, dim=-1)  # [B, 2M]
        src, tok = idx // v, idx % v
        raw_top = raw.view(b, m, v)[torch.arange(b, device=raw.device)[:, None], src, tok]
        top_l, src_l, tok_l, raw_l = top.tolist(), src.tolist(), tok.tolist(), raw_top.tolist()
        alts = alternatives_lists(*top_alternatives(raw, opts.top_logprobs)) if opts.top_logprobs else None

        next_src, next_tok, next_score = [], [], []
        for p in range(b):
            kept = []
            for rank in range(2 * m):
                hyp = beams[p][src_l[p][rank]]
                if len(finished[p]) >= m:
                    kept.append(rank)  # this prompt is done: keep its beams running as fillers
                elif tok_l[p][rank] in eos_set:
                    if rank < m and top_l[p][rank] > float("-inf"):
                        length = len(hyp.tokens) + 1
                        finished[p].append((top_l[p][rank] / length**opts.length_penalty, hyp, "eos"))
                elif top_l[p][rank] > float("-inf"):
                    kept.append(rank)
                if len(kept) == m:
                    break
            kept += [kept[-1] if kept else 0] * (m - len(kept))  # only when under M finite candidates exist
            new = []
            for rank in kept:
                hyp = beams[p][src_l[p][rank]]
                step_alts = [alts[p * m + src_l[p][rank]]] if alts else []  # the parent beam's distribution
                new.append(Hypothesis(hyp.tokens + [tok_l[p][rank]], hyp.logprobs + [raw_l[p][rank]],
                                      hyp.alternatives + step_alts))
                next_src.append(p * m + src_l[p][rank])
                next_tok.append(tok_l[p][rank])
                next_score.append(top_l[p][rank])
            beams[p] = new
        if all(len(f) >= m for f in finished) or i + 1 == steps:
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

    results = []
    for p in range(b):
        if len(finished[p]) < m:  # out of steps: the live beams compete as they are
            for hyp, s in zip(beams[p], next_score[p * m:(p + 1) * m]):
                finished[p].append((s / max(len(hyp.tokens), 1) ** opts.length_penalty, hyp, "length"))
        _, best, reason = max(finished[p], key=lambda f: f[0])
        answer = Answer(processor, eos, opts.stop, prompts.lengths[p], top=opts.top_logprobs > 0)
        alternatives = best.alternatives or [None] * len(best.tokens)
        for tok, lp, alt in zip(best.tokens, best.logprobs, alternatives):
            answer.push(tok, lp, track_text=bool(opts.stop), alternatives=alt)
        if answer.finish is None and reason == "eos":
            answer.finish = "eos"
        results.append(answer.result())
    return results

