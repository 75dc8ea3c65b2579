"""Held-out evaluation: exact match of greedy answers (or the other metrics of tasks/metrics.py: VQA accuracy, ANLS,
relaxed accuracy, CIDEr), overall and per group (task, question type), and the loss.

Answers that are boxes (`<loc..>` x 4 + label) also get the IoU of the first predicted box with the target's, and
the share whose label is right with IoU >= 0.5 (exact match is too strict for boxes: one grid step off fails it),
for examples about one image (an answer about several images has boxes in no one image's pixels).

Generation goes through the public `Pipeline.generate`, the same path users call (an example about several
images as one input's list of images). With several processes each
takes every world-th example and the per-example results are summed over processes, so every process ends with the
same numbers (no pickled objects travel).
"""

from __future__ import annotations

import functools
from collections import defaultdict

import torch

from palitorch.inference.images import upright_size
from palitorch.inference.pipeline import Pipeline
from palitorch.inference.processor import Processor
from palitorch.tasks import metrics as metrics_lib
from palitorch.tasks.detection import split_objects
from palitorch.tasks.metrics import normalize_answer
from palitorch.tasks.segmentation import load_vae_params, mask_overlap
from palitorch.train import ddp
from palitorch.train.data import Dataset, Example


def subset(n: int, k: int, seed: int) -> list[int]:
    """A fixed random subset of k of n indices (all when k is 0 or >= n), in file order."""
    if k <= 0 or k >= n:
        return list(range(n))
    g = torch.Generator().manual_seed(seed)
    return sorted(torch.randperm(n, generator=g)[:k].tolist())


def answer_tokens(processor: Processor, examples: list[Example]) -> torch.Tensor:
    """Each example's answer (suffix) length in tokens, <eos> not counted (the suffix alone: an example too long
    for the context, or with text the prompt checks refuse, is still counted, and scored as a wrong answer)."""
    texts = [e.suffix.encode("utf-8", "replace").decode("utf-8") for e in examples]  # (a lone surrogate: "?")
    return torch.tensor([len(processor.suffix_ids(t)) - 1 for t in texts], dtype=torch.long)


def cut_answers(answers: torch.Tensor, max_new_tokens: int, setting: str = "[eval] max_new_tokens") -> str | None:
    """A warning when some held-out answers (`answers`: their lengths in tokens, as `answer_tokens` counts them)
    are longer than the evaluation generates (they would be cut short and count as wrong), else None."""
    over = int((answers > max_new_tokens).sum())
    if not over:
        return None
    return (f"{over} of the {len(answers)} eval answers are longer than {setting} ({max_new_tokens} tokens; the "
            f"longest is {int(answers.max())}): they are cut short and count as wrong; raise {setting}")


def references(example: Example) -> list[str]:
    """What an example's answer is compared with: its "answers" list where it has one (VQAv2's ten human answers,
    several captions), else its suffix."""
    answers = example.meta.get("answers")
    return list(answers) if isinstance(answers, list) and answers else [example.suffix]


@torch.no_grad()
def exact_match(model, processor, examples: list[Example], idx: list[int], batch_size: int, max_new_tokens: int,
                group_by: list[str], d: ddp.Dist, generate=None, keep_going=lambda: True,
                metrics=("exact",), per_example: dict | None = None, vae: dict | None = None,
                image_size=upright_size) -> dict:
    """{"exact_match": float, "n": int, "<field>": {value: {"exact_match", "n"}}} for the examples at `idx`, and
    likewise each other of `metrics` (names of tasks/metrics.py: "vqa" reports "vqa_accuracy", ...), each answer
    compared with the example's `references`.

    `generate(images, prompts, max_new_tokens)` defaults to `Pipeline(model, processor).generate` (with a
    `generate` of its own, `model` may be None: answers made without one, in the order of `idx`); an example's
    images are its Example.image (a tuple for several: one input's list). `keep_going()`,
    asked before each batch, ends the evaluation early when False (the figures are then of no use).
    `per_example` (a dict), when given, receives each metric's scores of the examples (lists in the order of `idx`).
    With `vae` (tasks.load_vae_params), segmentation answers about one image are also scored by their masks at the
    image's size (`image_size(path) -> (width, height)`): "segments" {"n", "mean_iou", "overall_iou" (all
    intersections over all unions)}, and per_example["segments"] {position: IoU}; two empty masks agree (IoU 1).
    """
    was_training = model is not None and model.training
    if model is not None:
        model.eval()
    own_pipeline = generate is None
    if own_pipeline:
        pipe = Pipeline(model, processor)

        def generate(images, prompts, max_new_tokens):
            return [r.text for r in pipe.generate(images, prompts, max_new_tokens=max_new_tokens)]

    device = next(model.parameters()).device if model is not None else torch.device("cpu")
    rowed = [m for m in metrics if m != "cider"]  # (CIDEr is computed from all the answers at the end)
    # Per example: each per-example metric; for box answers the IoU of the first box and whether its label is right;
    # with a VAE, for segmentation answers 1 and their masks' intersection and union in pixels.
    box = len(rowed)
    scores = torch.zeros(box + 2 + 3 * (vae is not None), len(idx), dtype=torch.float64, device=device)
    texts: dict[int, str] = {}
    mine = list(range(d.rank, len(idx), d.world))
    for start in range(0, len(mine), batch_size):
        if not keep_going():
            break
        part = mine[start: start + batch_size]
        ex = [examples[idx[j]] for j in part]
        answers = generate([e.image for e in ex], [e.prefix for e in ex], max_new_tokens)
        for j, e, text in zip(part, ex, answers):
            texts[j] = text
            refs = references(e)
            for row, metric in enumerate(rowed):
                scores[row, j] = metrics_lib.score(metric, text, refs)
            scores[box:box + 2, j] = torch.tensor(box_score(text, e.suffix), dtype=torch.float64)
            if vae is not None and len(e.images) == 1 and \
                    (overlap := mask_overlap(text, e.suffix, vae, image_size(e.images[0]))):
                scores[box + 2:, j] = torch.tensor((1.0, *overlap), dtype=torch.float64)
    ddp.all_reduce_sum(scores, d)
    if own_pipeline:  # its KV caches: training has better use for the memory
        model.clear_caches()
    if model is not None:
        model.train(was_training)
    chosen = [examples[i] for i in idx]
    per = {metric: scores[row].cpu().tolist() for row, metric in enumerate(rowed)}
    if "cider" in metrics:  # a figure of the whole set: every answer is needed
        every = all_texts(texts, len(idx), d, device)
        per["cider"] = metrics_lib.cider(every, [references(e) for e in chosen])
    per = {metric: per[metric] for metric in metrics}
    if per_example is not None:
        per_example.update(per)
    out = group_metrics(chosen, per, group_by)
    boxed = [k for k, e in enumerate(chosen) if len(e.images) == 1 and split_objects(e.suffix)]
    if boxed:
        iou, label = scores[box, boxed], scores[box + 1, boxed]
        out["boxes"] = {"n": len(boxed), "mean_iou": float(iou.mean()),
                        "label_and_iou50": float(((iou >= 0.5) & (label > 0)).double().mean())}
    segmented = (scores[box + 2].cpu() > 0).nonzero()[:, 0].tolist() if vae is not None else []
    if segmented:
        inter, union = scores[box + 3, segmented].cpu(), scores[box + 4, segmented].cpu()
        ious = torch.where(union > 0, inter / union.clamp(min=1), 1.0)
        out["segments"] = {"n": len(segmented), "mean_iou": float(ious.mean()),
                           "overall_iou": float(inter.sum() / union.sum()) if union.sum() > 0 else 1.0}
        if per_example is not None:
            per_example["segments"] = dict(zip(segmented, ious.tolist()))
    return out


def all_texts(texts: dict[int, str], n: int, d: ddp.Dist, device=None) -> list[str]:
    """The n answers of all processes, each of which holds some of them (`texts`: position -> answer), in order:
    summed over processes as byte tensors on `device` (no pickled objects travel). An answer no process gave (an
    evaluation ended early) is ""."""
    encoded = {j: t.encode("utf-8") for j, t in texts.items()}
    width = torch.tensor([max(map(len, encoded.values()), default=0)], dtype=torch.float64, device=device)
    width = int(-ddp.all_reduce_min(-width, d)[0])
    table = torch.zeros(n, width, dtype=torch.int32)
    for j, b in encoded.items():
        table[j, :len(b)] = torch.tensor(list(b), dtype=torch.int32)
    table = ddp.all_reduce_sum(table.to(device), d).cpu()
    return [bytes(row[row > 0].tolist()).decode("utf-8", errors="replace") for row in table]


def box_score(prediction: str, target: str) -> tuple[float, float]:
    """(IoU of the first predicted box with the first target box, 1.0 if their labels agree); (0, 0) if no box."""
    want, got = split_objects(target), split_objects(prediction)
    if not want or not got:
        return 0.0, 0.0
    (a, _, la), (b, _, lb) = want[0], got[0]
    return iou(a, b), float(normalize_answer(la) == normalize_answer(lb))


def iou(a, b) -> float:
    """Intersection over union of two (y0, x0, y1, x1) boxes on the <loc> grid."""
    ay0, ax0, ay1, ax1 = a
    by0, bx0, by1, bx1 = b
    inter = max(0, min(ay1, by1) - max(ay0, by0)) * max(0, min(ax1, bx1) - max(ax0, bx0))
    union = (ay1 - ay0) * (ax1 - ax0) + max(0, by1 - by0) * max(0, bx1 - bx0) - inter
    return inter / union if union > 0 else 0.0


def group_metrics(examples: list[Example], scores: dict[str, list[float]], group_by: list[str]) -> dict:
    """Each metric's mean over the examples (reported under its name in tasks/metrics.METRICS) and over each group:
    the examples with one value of a `group_by` field."""
    n = len(examples)

    def means(rows: list[int]) -> dict:
        return {metrics_lib.METRICS[m]: sum(v[k] for k in rows) / max(1, len(rows)) for m, v in scores.items()} | \
            {"n": len(rows)}

    out = means(list(range(n)))
    for key in group_by:
        groups: dict[str, list[int]] = defaultdict(list)
        for k, e in enumerate(examples):
            if key in e.meta:
                groups[str(e.meta[key])].append(k)
        if groups:
            out[key] = {g: means(rows) for g, rows in sorted(groups.items())}
    return out


def of_run(trainer, final: bool = False) -> dict:
    """A training run's evaluation (train/loop.py): the eval loss and the `[eval] metrics` over `[eval]
    max_examples` of the held-out examples (`final_max_examples` for the final one; {} without an eval set). A
    periodic one ends early when the run is asked to stop."""
    e = trainer.cfg.eval
    if not trainer.eval_examples:
        return {}
    idx = subset(len(trainer.eval_examples), e.final_max_examples if final else e.max_examples, trainer.cfg.train.seed)
    go = (lambda: True) if final else (lambda: not trainer._stopping)
    metrics = {"eval_loss": loss(trainer.model, trainer.eval_data, idx, e.batch_size, trainer.dist,
                                 trainer._autocast, go)}
    metrics.update(exact_match(trainer.model, trainer.processor, trainer.eval_examples, idx, e.batch_size,
                               e.max_new_tokens, e.group_by, trainer.dist, keep_going=go, metrics=e.metrics,
                               vae=vae_params(e.vae)))
    return metrics


@functools.lru_cache(maxsize=2)
def vae_params(path: str) -> dict | None:
    """[eval] vae's weights, read once per process (None without one)."""
    return load_vae_params(path) if path else None


@torch.no_grad()
def loss(model, data: Dataset, idx: list[int], batch_size: int, d: ddp.Dist, autocast,
         keep_going=lambda: True) -> float:
    """Mean cross-entropy per suffix token over the examples at `idx` (teacher forcing); `keep_going` as for
    `exact_match`."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total = torch.zeros(2, dtype=torch.float64, device=device)  # summed token losses, token count
    mine = idx[d.rank::d.world]
    for start in range(0, len(mine), batch_size):
        if not keep_going():
            break
        batch = {k: v.to(device) for k, v in data.batch(mine[start: start + batch_size]).items()}
        with autocast():
            out = model(**batch, return_logits=False)
        n = (batch["labels"][:, 1:] != -100).sum()
        total += torch.stack([out.loss.double() * n, n.double()])
    ddp.all_reduce_sum(total, d)
    model.train(was_training)
    return float(total[0] / total[1].clamp(min=1))


LABELS = {"exact_match": "exact match", "vqa_accuracy": "VQA accuracy", "anls": "ANLS",
          "relaxed_accuracy": "relaxed accuracy", "cider": "CIDEr"}


def summary(label: str, m: dict) -> str:
    """The printed lines of evaluation metrics `m` (whichever of them it holds), the first one starting `label: `.
    A group's line gives its figure of each metric, in the first line's order ("a 0.5000 / 1.2000")."""
    shown = [k for k in LABELS if k in m]
    head = [f"{LABELS[k]} {m[k]:.4f}" for k in shown]
    if head:
        head[-1] += f" (n={m.get('n', '?')})"
    head += [f"eval loss {m['eval_loss']:.4f}"] if "eval_loss" in m else []
    parts = [f"{label}: " + (", ".join(head) or "no evaluation metrics")]
    for key, groups in m.items():
        if key == "boxes":
            parts.append(f"  boxes: mean IoU {groups['mean_iou']:.4f}, label right and IoU >= 0.5 "
                         f"{groups['label_and_iou50']:.4f} (n={groups['n']})")
        elif key == "segments":
            parts.append(f"  masks: mean IoU {groups['mean_iou']:.4f}, overall IoU {groups['overall_iou']:.4f} "
                         f"(n={groups['n']})")
        elif isinstance(groups, dict):
            parts.append(f"  {key}: " + ", ".join(f"{g} " + " / ".join(f"{v[k]:.4f}" for k in shown if k in v)
                                                   for g, v in groups.items()))
    return "\n".join(parts)
