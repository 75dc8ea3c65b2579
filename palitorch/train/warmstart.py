"""Vision warm-start: train the vision tower alone as an image classifier before the vision-language loop.

A from-scratch decoder learns the text-only answer prior long before it learns to read the image, and then stops
looking (easy-VQA: 82.5% on yes/no questions from the question alone). A tower that already separates the images'
classes gives the decoder something worth reading from the first step.

Labels come from the data itself: the training examples whose prefix is `[warmstart] prefix` (e.g. `caption en`),
one per image; word k of their suffix is the label of classifier k (for `teal circle`: colour and shape). Each
classifier is one linear layer on the mean-pooled vision output; the heads are discarded afterwards.

With `[warmstart] boxes = "detect"`, the boxes of each image's detection answers (the examples whose prefix is
that text, or starts with it and a space) also give a dense target: every patch token predicts, through one more
linear head, which of its p x p pixels lie inside a box (binary cross-entropy). Classification needs only what
is in the image; a box coordinate needs where, to the pixel, and this teaches the tower that from its first steps.
With `box_edges` as well, every patch token also classifies the four edges of the image's first box (y0 x0 y1 x1 in
pixels, 0..S): a global target that makes each token carry where the whole box lies, so the decoder can read an
edge from any of them instead of having to find the one patch that holds it.

Axes: B batch, P patches, C vision hidden size, S image side, p patch side.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from palitorch.errors import ConfigError
from palitorch.tasks.detection import split_objects
from palitorch.train import ddp
from palitorch.train.build import lr_at
from palitorch.train.config import TrainConfig
from palitorch.train.data import Example, augment, augments, epoch_order
from palitorch.train.images import Images


def labels_from(examples: list[Example], prefix: str) -> tuple[list[Example], torch.Tensor, list[list[str]]]:
    """One example per image whose prefix is `prefix`; labels [N, K] (-100 where a suffix has fewer words)."""
    seen, chosen = set(), []
    for e in examples:
        if e.prefix == prefix and e.image not in seen:
            seen.add(e.image)
            chosen.append(e)
    if not chosen:
        raise ConfigError(f"[warmstart] no training example has the prefix {prefix!r} to take labels from")
    words = [e.suffix.split() for e in chosen]
    k = max(len(w) for w in words)
    classes = [sorted({w[i] for w in words if len(w) > i}) for i in range(k)]
    labels = torch.full((len(chosen), k), -100, dtype=torch.long)
    for n, w in enumerate(words):
        for i, word in enumerate(w):
            labels[n, i] = classes[i].index(word)
    return chosen, labels, classes


def detection_boxes(examples: list[Example], prefix: str) -> dict:
    """image -> the <loc> boxes (y0, x0, y1, x1) of its detection answers, in order: those of the examples whose
    prefix is `prefix` or starts with it and a space."""
    boxes: dict = {}
    for e in examples:
        if e.prefix == prefix or e.prefix.startswith(prefix + " "):
            boxes.setdefault(e.image, []).extend(locs for locs, _, _ in split_objects(e.suffix))
    return boxes


def box_masks(examples: list[Example], chosen: list[Example], prefix: str, size: int, patch: int) -> torch.Tensor:
    """Per image of `chosen`: [P, p*p] floats, 1 where a pixel centre lies inside a box of its `prefix` answers.

    Rows of images without a detection answer are -1 (not scored). Patches are in the tower's row-major order.
    """
    boxes = detection_boxes(examples, prefix)
    centres = (torch.arange(size, dtype=torch.float64) + 0.5) / size * 1023  # pixel centres on the loc grid
    n = size // patch
    out = torch.full((len(chosen), n * n, patch * patch), -1.0)
    for i, e in enumerate(chosen):
        if e.image not in boxes:
            continue
        mask = torch.zeros(size, size, dtype=torch.bool)
        for y0, x0, y1, x1 in boxes[e.image]:
            rows = (centres >= min(y0, y1)) & (centres < max(y0, y1))
            cols = (centres >= min(x0, x1)) & (centres < max(x0, x1))
            mask |= rows[:, None] & cols[None, :]
        out[i] = mask.reshape(n, patch, n, patch).permute(0, 2, 1, 3).reshape(n * n, patch * patch).float()
    return out


def box_edges(examples: list[Example], chosen: list[Example], prefix: str, size: int) -> torch.Tensor:
    """Per image of `chosen`: [4] long, the first box of its `prefix` answers as pixel edges y0 x0 y1 x1 (0..size),
    -100 for images without one."""
    boxes = detection_boxes(examples, prefix)
    out = torch.full((len(chosen), 4), -100, dtype=torch.long)
    for i, e in enumerate(chosen):
        if boxes.get(e.image):
            y0, x0, y1, x1 = boxes[e.image][0]
            edges = (min(y0, y1), min(x0, x1), max(y0, y1), max(x0, x1))
            out[i] = torch.tensor([min(size, round(v / 1023 * size)) for v in edges])
    return out


def warmstart(model, processor, examples: list[Example], images: Images, cfg: TrainConfig, d: ddp.Dist,
              device: torch.device, autocast, progress: Callable | None = None) -> dict:
    """Train `model.vision_tower` (and throwaway heads) for `[warmstart] epochs`; returns per-head accuracy."""
    w = cfg.warmstart
    chosen, labels, classes = labels_from(examples, w.prefix)
    tower = model.vision_tower
    g = torch.Generator().manual_seed(cfg.train.seed + 1)
    heads = nn.ModuleList(nn.Linear(tower.cfg.hidden_size, len(c)) for c in classes).to(device)
    masks = None
    if w.boxes:
        size, patch = tower.cfg.image_size, tower.cfg.patch_size
        masks = box_masks(examples, chosen, w.boxes, size, patch)
        if not bool((masks[:, 0, 0] >= 0).any()):
            raise ConfigError(f"[warmstart] boxes: no training example with the prefix {w.boxes!r} has a box")
        heads.append(nn.Linear(tower.cfg.hidden_size, patch * patch).to(device))
    edges = None
    if w.box_edges:
        if not w.boxes:
            raise ConfigError("[warmstart] box_edges needs boxes (the prefix of the detection examples)")
        edges = box_edges(examples, chosen, w.boxes, tower.cfg.image_size)
        heads.append(nn.Linear(tower.cfg.hidden_size, 4 * (tower.cfg.image_size + 1)).to(device))
    with torch.no_grad():
        for h in heads:
            h.weight.copy_(torch.randn(h.weight.shape, generator=g) * cfg.model.init_std)
            h.bias.zero_()
    params = [p for p in tower.parameters()] + [p for p in heads.parameters()]
    frozen = [p for p in tower.parameters() if not p.requires_grad]
    for p in frozen:
        p.requires_grad_(True)  # the warm-start trains the tower whatever [train] trainable says
    opt = torch.optim.AdamW(params, lr=w.lr, weight_decay=cfg.optim.weight_decay,
                            betas=(cfg.optim.beta1, cfg.optim.beta2), eps=cfg.optim.eps)
    n = len(chosen)
    bs = min(w.batch_size, n)
    if bs < d.world:
        raise ConfigError(f"[warmstart] batch_size {bs} is smaller than the {d.world} processes")
    per_epoch = n // bs
    total = max(1, math.ceil(w.epochs * per_epoch))
    hits = torch.zeros(len(heads), 2, dtype=torch.float64, device=device)  # correct, counted: last epoch
    tower.train()
    bar = progress(total, "warm-start") if progress else None
    for step in range(total):
        epoch, i = divmod(step, per_epoch)
        idx = epoch_order(n, cfg.train.seed + 1, epoch)[i * bs: (i + 1) * bs].tolist()
        part = ddp.shard(bs, d)
        mine = idx[part]
        x = images.batch([chosen[j].image for j in mine])
        if augments(cfg.augment):
            x = augment(x, cfg.augment, cfg.train.seed + 1, step, range(part.start, part.stop))
        y = labels[mine].to(device)
        with autocast():
            tokens = tower(processor.normalize(x.to(device)))  # [B, P, C]
            pooled = tokens.mean(dim=1).float()  # [B, C]
        loss = torch.zeros((), device=device)
        if masks is not None:
            target = masks[mine].to(device)  # B P p*p, -1 for images without a box
            scored = target[:, 0, 0] >= 0
            valid = max(1, int((masks[idx, 0, 0] >= 0).sum()))  # over the GLOBAL batch, as for the classifiers
            logits = heads[len(classes)](tokens.float())[scored]
            loss = loss + nn.functional.binary_cross_entropy_with_logits(
                logits, target[scored], reduction="sum") / (valid * target[0].numel())
            if step >= total - per_epoch:
                hits[len(classes), 0] += ((logits > 0) == (target[scored] > 0.5)).sum()
                hits[len(classes), 1] += logits.numel()
        if edges is not None:
            target = edges[mine].to(device)  # B 4, -100 for images without a box
            scored = target[:, 0] >= 0
            valid = max(1, int((edges[idx, 0] >= 0).sum()))
            logits = heads[-1](tokens.float())[scored]  # b P 4*(S+1)
            logits = logits.view(*logits.shape[:2], 4, -1)
            want = target[scored][:, None, :].expand(-1, logits.shape[1], -1)  # b P 4
            loss = loss + w.box_edges_weight * nn.functional.cross_entropy(
                logits.flatten(0, 2), want.flatten(), reduction="sum") / (valid * logits.shape[1] * 4)
            if step >= total - per_epoch:
                hits[-1, 0] += (logits.argmax(-1) == want).sum()
                hits[-1, 1] += want.numel()
        for k, head in enumerate(heads[: len(classes)]):
            logits = head(pooled)
            # Each head's mean over the GLOBAL batch's labelled images: the same sum on 1 or N processes.
            valid = max(1, int((labels[idx, k] != -100).sum()))  # (a batch may hold no image with this word)
            loss = loss + nn.functional.cross_entropy(logits, y[:, k], ignore_index=-100, reduction="sum") / valid
            if step >= total - per_epoch:
                known = y[:, k] != -100
                hits[k, 0] += ((logits.argmax(-1) == y[:, k]) & known).sum()
                hits[k, 1] += known.sum()
        loss.backward()
        ddp.all_reduce_grads(params, d)
        if cfg.optim.clip_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, cfg.optim.clip_grad_norm)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, total, cfg.optim, lr=w.lr, warmup=min(w.warmup_steps, total // 10))
        opt.step()
        opt.zero_grad(set_to_none=True)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{ddp.all_reduce_sum(loss.detach().clone(), d).item():.4f}", refresh=False)
        else:
            ddp.all_reduce_sum(loss.detach().clone(), d)  # keep the collectives in step across processes
    if bar is not None:
        bar.close()
    for p in frozen:
        p.requires_grad_(False)
    ddp.all_reduce_sum(hits, d)
    names = [len(c) for c in classes] + (["box mask"] if masks is not None else []) + (
        ["box edges"] if edges is not None else [])
    return {
        "warmstart": {"steps": total, "images": n, "heads": names,
                      "train_accuracy": [float(h[0] / h[1].clamp(min=1)) for h in hits]}
    }
