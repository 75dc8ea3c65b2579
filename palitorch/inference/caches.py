"""The KV caches a generation decodes into: reused while they fit, and with CUDA graphs kept in a pool.

A cache is `model.setup_caches`'s: per layer, keys and values [B, K, S, D] for B rows of S slots. A generation
takes the model's caches when they fit (`ensure_caches`); otherwise it allocates new ones. A CUDA graph records
the addresses of the caches it reads and writes and replays only on that memory: new caches of the same shape are
recorded anew (and torch keeps every recording). So with CUDA graphs (`Steps.caches`), caches are pooled by
(rows, slots), and a generation at a shape seen before gets its earlier caches back.

A compiled decode step is a static-shape graph per batch size and cache length, compiled on first use (seconds on
a CPU, tens of seconds for a 3B model on a GPU). So a compiled pipeline sizes its caches on a ladder,
`cache_length`: 64 x 1, 2, 3, 4, 6, 8, 12, ... slots, two lengths per doubling, whatever lengths its requests ask
for; rounded to 64 slots alone, a server's varied prompts and max_tokens kept compiling new graphs for hours.
Batch sizes keep to the same ladder (`Pipeline._padded_size`), and dynamo's limit on a function's graphs is raised
above the grid the two ladders make (`raise_recompile_limit`).
"""

from __future__ import annotations

import torch

from palitorch.model import PaliGemma


def ladder(n: int) -> int:
    """The first of 1, 2, 3, 4, 6, 8, 12, 16, 24, ... (2^k and 3 * 2^k) at or above n (n >= 1)."""
    step = 1 << (n - 1).bit_length()  # the power of two at or above n
    return 3 * step // 4 if step >= 4 and 3 * step // 4 >= n else step


def batch_rungs(limit: int) -> list[int]:
    """The batch sizes a compiled pipeline runs batches at, up to `limit`: 1, 2, 3, 4, 6, 8, 12, ..."""
    return [n for n in range(1, limit + 1) if ladder(n) == n]


def batch_rung_below(n: int) -> int:
    """The last of 1, 2, 3, 4, 6, 8, 12, ... at or below n (n >= 1)."""
    power = 1 << (n.bit_length() - 1)  # the power of two at or below n
    return 3 * power // 2 if power >= 2 and 3 * power // 2 <= n else power


def cache_length(length: int, compiled: bool = False) -> int:
    """The slots of new caches for `length`: rounded up to 64, and for a compiled step to 64 x `ladder` (at most
    1.5x the need, past 256 slots)."""
    blocks = -(-length // 64)
    return 64 * (ladder(blocks) if compiled else blocks)


def ensure_caches(model: PaliGemma, batch: int, length: int, pool: dict | None = None, compiled: bool = False) -> int:
    """Reuse the model's KV caches when they fit `batch` rows of `length` slots, else allocate; returns S.

    New caches have `cache_length(length, compiled)` slots, so that calls of similar lengths share them (a compiled
    step: caches of a ladder length only). Caches far longer than needed are reallocated: every decode step attends
    over all S slots. `pool` (`Steps.caches`, with CUDA graphs): caches kept by (rows, slots) to be used again,
    since a graph recorded on caches replays only on that memory (new caches of the same shape would be recorded
    anew, and torch keeps every recording).
    """
    def fits(rows: int, s: int) -> bool:
        return rows == batch and length <= s <= 2 * length + 64 and (not compiled or cache_length(s, True) == s)

    cache = model.language_model.layers[0].attn.kv_cache
    if cache is not None and fits(cache.k.shape[0], cache.k.shape[2]):
        if pool is not None:  # (they may be caches made before the pool, or a live batch's)
            keep_caches(model, pool)
        return cache.k.shape[2]
    if pool is not None and (hit := min((key for key in pool if fits(*key)), key=lambda key: key[1], default=None)):
        use_caches(model, pool, hit)
        return hit[1]
    s = cache_length(length, compiled)
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


def keep_caches(model: PaliGemma, pool: dict, limit: int | None = POOLED) -> None:
    """Pool the model's caches under their (rows, slots), dropping the least recently used beyond `limit` shapes
    (None: no limit; a live batch's pool keeps one cache length instead)."""
    layers = model.language_model.layers
    k = layers[0].attn.kv_cache.k
    pool.pop((k.shape[0], k.shape[2]), None)
    pool[(k.shape[0], k.shape[2])] = [layer.attn.kv_cache for layer in layers]
    while limit is not None and len(pool) > limit:
        del pool[next(iter(pool))]


_RECOMPILE_LIMIT = "recompile_limit"  # dynamo's setting; "cache_size_limit" before torch 2.7


def raise_recompile_limit(at_least: int = 256) -> None:
    """Every model, batch size and cache length compiles its own static-shape graph of one code object (the decode
    step); past dynamo's default limit of 8 such graphs it would run the step eagerly, with a log line only. The
    batch sizes and cache lengths keep to ladders (`_padded_size`, `caches.cache_length`): for a context of 8192
    and batches of up to 48 rows, 14 lengths x 11 sizes at most, under this limit. The setting is per thread (a
    ContextVar since torch 2.1x: a new thread starts at the default), so it is raised in each thread that runs a
    compiled step; dynamo's limit on a code object's compilations in all is raised with it."""
    import torch._dynamo.config as dynamo_config

    limit = _RECOMPILE_LIMIT if hasattr(dynamo_config, _RECOMPILE_LIMIT) else "cache_size_limit"  # older name
    for name in (limit, "accumulated_recompile_limit"):
        if hasattr(dynamo_config, name) and getattr(dynamo_config, name) < at_least:
            setattr(dynamo_config, name, at_least)
