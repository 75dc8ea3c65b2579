"""PaliGemma: SigLIP patches -> linear projector -> Gemma, with the prefix-LM attention mask.

The sequence is `<image> * P, <bos>, prompt, "\\n"` (the prefix, attended bidirectionally) followed by the answer
and `<eos>` (the suffix, attended causally). The model knows nothing about files, tokenizers or sampling.

Axes: B batch, T sequence length, S cache slots, P image patches, R image side (pixels [B, 3, R, R]), C vision
hidden size, H text hidden size, V vocab.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from palitorch.config import PaliGemmaConfig
from palitorch.model.gemma import Gemma

# Linear is nn.Linear's maths and weights; at CPU inference it may pick a faster kernel (see kernels.py)
from palitorch.model.kernels import Linear
from palitorch.model.siglip import SigLIP


def prefix_lm_mask(token_type_ids: torch.Tensor, valid: torch.Tensor, window: int | None = None) -> torch.Tensor:
    """The attention mask [B, 1, T, T] (True = may attend) for token types [B, T] (0 prefix, 1 suffix).

    `cumsum(types)` numbers the causal steps: key k is visible to query q when `c[k] <= c[q]`, so every prefix token
    (c = 0) sees the whole prefix and each suffix token sees the prefix and the suffix up to itself::

        types   0 0 0 1 1         c = 0 0 0 1 2         row q=3 (first suffix token): 1 1 1 1 0

    Padding keys (`valid` False) are hidden; each token always sees itself, so no row is empty. `window` (Gemma 2's
    sliding layers) also hides keys W or more steps behind a suffix query; the prefix stays bidirectional.
    """
    c = token_type_ids.long().cumsum(-1)
    mask = (c[:, None, :] <= c[:, :, None]) & valid[:, None, :].bool()
    t = token_type_ids.shape[-1]
    idx = torch.arange(t, device=token_type_ids.device)
    if window is not None:
        near = (idx[:, None] - idx[None, :]) < window  # [T, T]
        mask = mask & (near | (c == 0)[:, :, None])
    return (mask | torch.eye(t, dtype=torch.bool, device=mask.device)).unsqueeze(1)


@dataclass
class Output:
    logits: torch.Tensor | None  # [B, T, V]; None when only the loss was asked for
    loss: torch.Tensor | None = None


class PaliGemma(nn.Module):
    def __init__(self, cfg: PaliGemmaConfig):
        super().__init__()
        self.cfg = cfg
        self.vision_tower = SigLIP(cfg.vision)
        self.projector = Linear(cfg.vision.hidden_size, cfg.text.hidden_size)  # the whole projector
        self.language_model = Gemma(cfg.text)

    # -------------------------------------------------------------- the multimodal pieces

    def embed_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels [B, 3, R, R] -> [B, P, H] image tokens for the decoder (unscaled, unlike text embeddings)."""
        return self.projector(self.vision_tower(pixels))

    def embed(
        self, input_ids: torch.Tensor, pixels: torch.Tensor | None, image_index: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Text embeddings with each image's P features written over its P `<image>` positions. [B, T, H]

        The images fill the `<image>` positions in order, P at a time, sequence by sequence: a sequence with k images
        has k * P `<image>` tokens (PaliGemma encodes each image apart and puts their tokens one after another, as in
        its NLVR2 and video transfers). `image_index` [N] lets them share images: pixels is then [U, 3, R, R] (U
        distinct images) and the n-th image in that order is `image_index[n]`, so the vision tower runs once per
        image (several questions about one image). Without it, pixels holds the N images in that order. `pixels` may
        also be the images' features [U, P, H] from `embed_image`, computed earlier (by a caller that keeps them).
        """
        is_image = input_ids == self.cfg.image_token_id
        # <image> ids may lie past the vocabulary: embed a dummy id there, overwritten below by the image features
        x = self.language_model.embed(input_ids.masked_fill(is_image, 0))
        if pixels is None:
            return x
        img = (pixels if pixels.dim() == 3 else self.embed_image(pixels)).to(x.dtype)
        if image_index is not None:
            img = img[image_index.to(img.device)]
        counts, p = is_image.sum(-1), img.shape[1]
        if not bool(((counts > 0) & (counts % p == 0)).all() & (counts.sum() == img.shape[0] * p)):
            raise ValueError(
                f"each sequence needs {p} <image> tokens per image at this resolution, {img.shape[0] * p} in all for "
                f"{img.shape[0]} images; got {counts.tolist()}"
            )
        return x.masked_scatter(is_image[..., None], img)

    # -------------------------------------------------------------- full-sequence forward (training, scoring)

    def forward(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        return_logits: bool = True,
        image_index: torch.Tensor | None = None,
    ) -> Output:
        """input_ids, attention_mask, token_type_ids, labels [B, T]; pixel_values [N, 3, R, R], the images in
        order, one per sequence or more (or [U, 3, R, R] with image_index [N], see `embed`).

        Without token_type_ids the whole sequence is prefix (as for a prompt). Positions count real tokens from 1
        (transformers' convention), so a padded sequence gives the same numbers as the unpadded one. Labels of
        -100 are ignored; the loss is the mean cross-entropy in float32 of each token predicting the next. With
        `return_logits=False` (training) the LM head runs only at scored positions and `logits` is None.
        """
        valid = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        types = torch.zeros_like(input_ids) if token_type_ids is None else token_type_ids
        positions = valid.long().cumsum(-1)
        x = self.embed(input_ids, pixel_values, image_index)
        mask = prefix_lm_mask(types, valid)
        sliding = None
        if self.cfg.text.sliding_window is not None and input_ids.shape[1] > self.cfg.text.sliding_window:
            sliding = prefix_lm_mask(types, valid, self.cfg.text.sliding_window)
        h = self.language_model(x, positions, mask, sliding)
        if labels is not None and not return_logits:
            # Training: the LM head only where a label is scored (most positions are image and prompt tokens).
            target = labels[:, 1:].to(h.device)
            scored = target != -100
            logits = self.language_model.logits(h[:, :-1][scored])  # [M, V]
            return Output(logits=None, loss=F.cross_entropy(logits.float(), target[scored]))
        logits = self.language_model.logits(h)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(
                logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten().to(logits.device), ignore_index=-100
            )
        return Output(logits=logits, loss=loss)

    # -------------------------------------------------------------- cached forward (generation)

    def setup_caches(self, batch: int, max_len: int, dtype=None, device=None) -> None:
        """Preallocate every layer's KV cache for `batch` sequences of at most `max_len` tokens."""
        self.language_model.setup_caches(batch, max_len, dtype, device)

    def clear_caches(self) -> None:
        self.language_model.clear_caches()

    def forward_cached(
        self,
        x: torch.Tensor,
        positions: torch.Tensor,
        cache_pos: torch.Tensor,
        mask: torch.Tensor,
        sliding_mask: torch.Tensor | None = None,
        last_only: bool = False,
    ) -> torch.Tensor:
        """Run embeddings x [B, T, H] written at cache slots cache_pos [T]; masks [B, 1, T, S] over the
        cache's first S slots: all of them, or (a prefill's) the T written.

        Returns logits [B, T, V], or [B, 1, V] for the last position only (`last_only`, as in prefill: the last
        layer then skips its attention output and MLP at every other position, whose results nothing reads).
        """
        h = self.language_model(x, positions, mask, sliding_mask, cache_pos, last_only)
        return self.language_model.logits(h)
