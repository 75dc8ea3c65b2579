"""The KV caches' lifetime: `setup_caches` allocates one per layer, `clear_caches` lets them go."""

import gc
import weakref

import pytest
import torch

from palitorch.config import small_preset
from palitorch.model import PaliGemma


@pytest.mark.parametrize("version", [1, 2])
def test_clear_caches_frees_every_layer_cache(version):
    cfg = small_preset("tiny", vocab_size=300, version=version)
    model = PaliGemma(cfg).eval()
    model.setup_caches(2, 32)
    caches = [layer.attn.kv_cache for layer in model.language_model.layers]
    assert all(c is not None and c.k.shape == (2, cfg.text.num_kv_heads, 32, cfg.text.head_dim) for c in caches)
    refs = [weakref.ref(t) for c in caches for t in (c.k, c.v)]
    del caches
    model.clear_caches()
    gc.collect()
    assert all(layer.attn.kv_cache is None for layer in model.language_model.layers)
    assert all(r() is None for r in refs)  # nothing else holds the tensors: their memory is returned
    ids = torch.full((1, cfg.num_image_tokens + 3), 5)
    ids[:, :cfg.num_image_tokens] = cfg.image_token_id
    out = model(ids, torch.zeros(1, 3, cfg.vision.image_size, cfg.vision.image_size))  # a full forward needs none
    assert out.logits.shape == (1, ids.shape[1], cfg.text.vocab_size)
