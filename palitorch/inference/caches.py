"""The KV caches a generation decodes into: reused while they fit, and with CUDA graphs kept in a pool.

A cache is `model.setup_caches`'s: per layer, keys and values [B, K, S, D] for B rows of S slots. A generation
takes the model's caches when they fit (`ensure_caches`); otherwise it allocates new ones. A CUDA graph records
the addresses of the caches it reads and writes and replays only on that memory: new caches of the same shape are
recorded anew (and torch keeps every recording). So with CUDA graphs (`Steps.caches`), caches are pooled by
(rows, slots), and a generation at a shape seen before gets its earlier caches back.
"""

from __future__ import annotations

import torch

from palitorch.model import PaliGemma


def ensure_caches(model: PaliGemma, batch: int, length: int, pool: dict | None = None) -> int:
    """Reuse the model's KV caches when they fit `batch` rows of `length` slots, else allocate; returns S.

    New caches are rounded up to 64 slots so that calls of similar lengths share them. Caches far longer than
    needed are reallocated: every decode step attends over all S slots. `pool` (`Steps.caches`, with CUDA graphs):
    caches kept by (rows, slots) to be used again, since a graph recorded on caches replays only on that memory
    (new caches of the same shape would be recorded anew, and torch keeps every recording).
    """
    def fits(rows: int, s: int) -> bool:
        return rows == batch and length <= s <= 2 * length + 64

    cache = model.language_model.layers[0].attn.kv_cache
    if cache is not None and fits(cache.k.shape[0], cache.k.shape[2]):
        if pool is not None:  # (they may be caches made before the pool, or a live batch's)
            keep_caches(model, pool)
        return cache.k.shape[2]
    if pool is not None and (hit := min((key for key in pool if fits(*key)), key=lambda key: key[1], default=None)):
        use_caches(model, pool, hit)
        return hit[1]
    s = -(-length // 64) * 64
    with torch.inference_mode(False):  # ordinary tensors, so that the caches outlive this inference-mode call
        model.setup_caches(batch, s)
    if pool is not None:
        keep_caches(model, pool)
    return s


POOLED = 4  # cache shapes a pool keeps (the most recently used)


def use_caches(model: PaliGemma, pool: dict, key: tuple[int, int]) -> None:
    """Give the model the pooled caches of `key` (rows, slots), now the most recently used."""
    pool[key] = pool.pop(key)
    for layer, cache in zip(model.language_model.layers, pool[key]):
        layer.attn.kv_cache = cache


def keep_caches(model: PaliGemma, pool: dict) -> None:
    """Pool the model's caches under their (rows, slots), dropping the least recently used beyond `POOLED`."""
    layers = model.language_model.layers
    k = layers[0].attn.kv_cache.k
    pool.pop((k.shape[0], k.shape[2]), None)
    pool[(k.shape[0], k.shape[2])] = [layer.attn.kv_cache for layer in layers]
    while len(pool) > POOLED:
        del pool[next(iter(pool))]
