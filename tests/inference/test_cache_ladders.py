"""The ladders a compiled pipeline keeps its shapes to (palitorch/inference/caches.py), as plain arithmetic: the
batch sizes 1, 2, 3, 4, 6, 8, 12, ... and the rung at or below a size, against a brute-force reading of the rule."""

from palitorch.inference import caches

RUNGS = sorted({1 << k for k in range(8)} | {3 << k for k in range(7)})  # 1, 2, 3, 4, 6, 8, 12, ..., 192


def test_ladder_and_the_rung_below_against_brute_force():
    for n in range(1, 150):
        assert caches.ladder(n) == min(r for r in RUNGS if r >= n), n
        assert caches.batch_rung_below(n) == max(r for r in RUNGS if r <= n), n
    assert caches.batch_rungs(13) == [1, 2, 3, 4, 6, 8, 12]


def test_caches_are_reused_while_they_fit_and_remade_when_far_too_long():
    """ensure_caches: the model's caches serve a call of as many rows whose length they hold, unless they have more
    than 2 x length + 64 slots (every decode step reads all of them): then new ones, rounded up to 64 slots."""
    import palitorch

    model = palitorch.load().model

    def slots():
        return model.language_model.layers[0].attn.kv_cache.k.shape[2]

    model.setup_caches(2, 1024)
    assert caches.ensure_caches(model, 2, 100) == 128 == slots()
    ptr = model.language_model.layers[0].attn.kv_cache.k.data_ptr()
    assert caches.ensure_caches(model, 2, 90) == 128  # fits: the same memory
    assert model.language_model.layers[0].attn.kv_cache.k.data_ptr() == ptr
    assert caches.ensure_caches(model, 2, 30) == 64 == slots()  # 128 > 2 * 30 + 64
    assert caches.ensure_caches(model, 3, 30) == 64 and model.language_model.layers[0].attn.kv_cache.k.shape[0] == 3


def test_a_pool_keeps_the_most_recently_used_shapes():
    """keep_caches: caches kept again (the model's own, which fit a call) become the most recently used, so the next
    new shape drops the least recently used one, not them (a CUDA graph recorded on them would be recorded anew)."""
    import palitorch

    model = palitorch.load().model
    pool: dict = {}
    for rows in (1, 2, 3, 4):
        model.setup_caches(rows, 64)
        caches.keep_caches(model, pool)
    caches.use_caches(model, pool, (2, 64))  # used again: now the newest
    model.setup_caches(1, 64)  # the model's own caches of a pooled shape, kept as ensure_caches keeps them
    caches.keep_caches(model, pool)
    model.setup_caches(6, 64)
    caches.keep_caches(model, pool)
    assert list(pool) == [(4, 64), (2, 64), (1, 64), (6, 64)]


def test_the_recompile_limits_are_raised_never_lowered():
    import torch._dynamo.config as dynamo_config

    name = "recompile_limit" if hasattr(dynamo_config, "recompile_limit") else "cache_size_limit"
    with dynamo_config.patch({name: 8}):
        caches.raise_recompile_limit(256)
        assert getattr(dynamo_config, name) == 256
    with dynamo_config.patch({name: 1000}):
        caches.raise_recompile_limit(256)
        assert getattr(dynamo_config, name) == 1000
