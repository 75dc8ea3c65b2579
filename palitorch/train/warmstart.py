"""Vision warm-start: train the vision tower alone as an image classifier before the vision-language loop.

A from-scratch decoder learns the text-only answer prior long before it learns to read the image, and then stops
looking (easy-VQA: 82.5% on yes/no questions from the question alone). A tower that already separates the images'
classes gives the decoder something worth reading from the first step.

Labels come from the data itself: the training examples whose prefix is `[warmstart] prefix` (e.g. `caption en`),
one per image; word k of their suffix is the label of classifier k (for `teal circle`: colour and shape). Each
classifier is one linear layer on the mean-pooled vision output; the heads are discarded afterwards.

Axes: B batch, P patches, C vision hidden size.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from palitorch.errors import ConfigError
from palitorch.train import ddp
from palitorch.train.build import lr_at
from palitorch.train.config import TrainConfig
from palitorch.train.data import Example, Images, augment, augments, epoch_order, normalize


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


def warmstart(model, processor, examples: list[Example], images: Images, cfg: TrainConfig, d: ddp.Dist,
              device: torch.device, autocast, progress: Callable | None = None) -> dict:
    """Train `model.vision_tower` (and throwaway heads) for `[warmstart] epochs`; returns per-head accuracy."""
    w = cfg.warmstart
    chosen, labels, classes = labels_from(examples, w.prefix)
    tower = model.vision_tower
    g = torch.Generator().manual_seed(cfg.train.seed + 1)
    heads = nn.ModuleList(nn.Linear(tower.cfg.hidden_size, len(c)) for c in classes).to(device)
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
    hits = torch.zeros(len(classes), 2, dtype=torch.float64, device=device)  # correct, counted: last epoch
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
            pooled = tower(normalize(x, processor).to(device)).mean(dim=1).float()  # [B, C]
        loss = torch.zeros((), device=device)
        for k, head in enumerate(heads):
            logits = head(pooled)
            # Each head's mean over the GLOBAL batch's labelled images: the same sum on 1 or N processes.
            valid = int((labels[idx, k] != -100).sum())
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
    return {
        "warmstart": {"steps": total, "images": n, "heads": [len(c) for c in classes],
                      "train_accuracy": [float(h[0] / h[1].clamp(min=1)) for h in hits]}
    }
