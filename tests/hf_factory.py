"""Tiny random PaliGemma checkpoints written by transformers itself (tests only: transformers is a test dependency)."""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import torch
from safetensors.torch import save_file

from palitorch.train.tokenizer import save_tokenizer, train_tokenizer

CORPUS = [
    "caption en", "answer en what color is the shape?", "detect cat ; dog", "segment cat", "ocr",
    "a cat sitting on a bench", "is there a blue circle in the image?", "the quick brown fox jumps over the lazy dog",
    "two dogs play in the snow", "what is written on the sign?", "yes", "no", "red", "green", "triangle",
]


@lru_cache(maxsize=1)
def tokenizer():
    return train_tokenizer(CORPUS * 10, vocab_size=400)


def hf_config(version=1, image_size=224, patch_size=14, heads=4, kv_heads=1, layers=2, hidden=64, head_dim=16,
              vision_hidden=48, vision_heads=4, vision_layers=2, text_extra=None, vision_extra=None, top_extra=None):
    from transformers import PaliGemmaConfig

    tok = tokenizer()
    vocab = tok.get_vocab_size()
    text = dict(
        model_type="gemma2" if version == 2 else "gemma", vocab_size=vocab, hidden_size=hidden,
        intermediate_size=hidden * 2, num_hidden_layers=layers, num_attention_heads=heads,
        num_key_value_heads=kv_heads, head_dim=head_dim,
    )
    if version == 2:
        # PaliGemma 2's text_config lists two EOS ids; transformers' generate (and palitorch) read it only when the
        # top level gives none, as here it does (1)
        second_eos = tok.encode(" the", add_special_tokens=False).ids[0]
        text.update(query_pre_attn_scalar=head_dim, eos_token_id=[1, second_eos])
    text.update(text_extra or {})
    vision = dict(
        model_type="siglip_vision_model", hidden_size=vision_hidden, intermediate_size=vision_hidden * 2,
        num_hidden_layers=vision_layers, num_attention_heads=vision_heads, image_size=image_size,
        patch_size=patch_size, vision_use_head=False,
    )
    vision.update(vision_extra or {})
    return PaliGemmaConfig(
        text_config=text, vision_config=vision, image_token_index=tok.token_to_id("<image>"),
        projection_dim=hidden, hidden_size=hidden, vocab_size=vocab, pad_token_id=0, bos_token_id=2, eos_token_id=1,
        **(top_extra or {}),
    )


def randomize(model: torch.nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            std = 0.5 if "embed" in name else (0.3 if p.ndim == 1 else 0.08)
            p.copy_(torch.randn(p.shape, generator=g) * std)


# Canonical (transformers 4.52+) names -> the other layouts found on the Hub. Written independently of palitorch's
# own key map, so that the loader is tested against the layouts rather than against itself.
LAYOUTS = {
    "new": (("model.language_model.", "model.language_model."),
            ("model.vision_tower.", "model.vision_tower.vision_model."),
            ("model.multi_modal_projector.", "model.multi_modal_projector."), ("lm_head.", "lm_head.")),
    "old": (("model.language_model.", "language_model.model."), ("model.vision_tower.", "vision_tower.vision_model."),
            ("model.multi_modal_projector.", "multi_modal_projector."), ("lm_head.", "language_model.lm_head.")),
    "v5": (("model.language_model.", "language_model.model."), ("model.vision_tower.", "vision_tower."),
           ("model.multi_modal_projector.", "multi_modal_projector."), ("lm_head.", "lm_head.")),
}


def rename(key: str, layout: str) -> str:
    for canonical, target in LAYOUTS[layout]:
        if key.startswith(canonical):
            return target + key[len(canonical):]
    raise KeyError(key)


def write_checkpoint(folder: Path, seed: int = 0, layout: str = "v5", shards: int = 1, dtype=torch.float32,
                     lm_head: bool = False, init=None, **cfg_kw):
    """Build a random transformers PaliGemma and save it as a Hub folder; returns (folder, hf_model in float32).

    layout "v5" is what transformers 5 writes itself; "new" and "old" are rewritten from the model's state dict.
    `lm_head` also stores the tied duplicate of the embedding, as some checkpoints do. `init(model, seed)` sets the
    weights in place of `randomize`.
    """
    from transformers import PaliGemmaForConditionalGeneration

    cfg = hf_config(**cfg_kw)
    torch.manual_seed(seed)
    model = PaliGemmaForConditionalGeneration(cfg).eval()
    (init or randomize)(model, seed)
    folder = Path(folder)
    model.to(dtype).save_pretrained(folder)
    if layout != "v5" or shards > 1 or lm_head:
        state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
        if not lm_head:
            state.pop("lm_head.weight")
        _write_weights(folder, {rename(k, layout): v for k, v in state.items()}, shards)
    model.float()
    save_tokenizer(tokenizer(), folder)
    image_size = cfg.vision_config.image_size
    (folder / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "SiglipImageProcessor", "processor_class": "PaliGemmaProcessor",
        "do_resize": True, "size": {"height": image_size, "width": image_size}, "resample": 3,
        "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.5, 0.5, 0.5], "do_convert_rgb": True,
        "image_seq_length": (image_size // cfg.vision_config.patch_size) ** 2,
    }, indent=2))
    return folder, model


def _write_weights(folder: Path, tensors: dict, shards: int) -> None:
    for f in folder.glob("model*.safetensors*"):
        f.unlink()
    keys = sorted(tensors)
    if shards == 1:
        save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
        return
    weight_map = {}
    for i in range(shards):
        name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: tensors[k] for k in keys[i::shards]}
        save_file(part, str(folder / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in part})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def hf_processor(folder: Path):
    from transformers import PaliGemmaProcessor, PreTrainedTokenizerFast
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

    pre = json.loads((folder / "preprocessor_config.json").read_text())
    ip = SiglipImageProcessorPil(size={"height": pre["size"]["height"], "width": pre["size"]["width"]})
    ip.image_seq_length = pre["image_seq_length"]
    tok = PreTrainedTokenizerFast.from_pretrained(folder)
    return PaliGemmaProcessor(image_processor=ip, tokenizer=tok)


def hf_generate(folder, hf, imgs, prompts, **kw):
    """transformers' greedy generate -> (tokens [B, n], logprobs [B, n]) for the generated part (left padding)."""
    proc = hf_processor(folder)
    proc.tokenizer.padding_side = "left"
    inputs = proc(images=imgs, text=prompts, return_tensors="pt", padding=True)
    out = hf.generate(**inputs, do_sample=False, output_logits=True, return_dict_in_generate=True, **kw)
    toks = out.sequences[:, inputs["input_ids"].shape[1]:]
    logp = torch.log_softmax(torch.stack(out.logits, 1).float(), -1)
    return toks, logp.gather(-1, toks[..., None])[..., 0]


def hf_suffix_logprobs(proc, hf, image, prefix: str, suffix: str):
    """transformers' answer to `pipe.score`: the suffix's token ids (its <eos> included) and their logprobs [n]
    under one forward of the processor's training-style input."""
    proc.tokenizer.padding_side = "right"
    inputs = proc(images=[image], text=[prefix], suffix=[suffix], return_tensors="pt")
    with torch.no_grad():
        logits = hf(**inputs).logits[0].float()
    ids = inputs["input_ids"][0]
    start = int(inputs["token_type_ids"][0].tolist().index(1))
    return ids[start:].tolist(), torch.log_softmax(logits[start - 1:-1], -1).gather(-1, ids[start:, None])[:, 0]


# Greedy logprobs of a `diverse` checkpoint, palitorch against transformers, both float32 on CPU. Those weights are
# chaotic on purpose (each matrix multiplies a vector's norm by ~4), so float32 rounding alone moves a logprob up to
# ~3e-4 from its float64 value, in transformers as in palitorch: measured on an AMD EPYC (Zen 4), a left-padded
# batch of 3, 32 tokens: transformers 2.9e-4 and palitorch 1.9e-4 from float64, 1.03e-4 from each other (on the
# Intel Xeon VM, under 1e-4). What these tests exist to catch (a wrong mask, scale, position or cache slot) changes
# the tokens themselves or moves logprobs by orders of magnitude more. test_generate checks palitorch against
# float64 too, with the same tolerance.
DIVERSE_LOGPROB_TOL = 3e-4


def diverse(ckpt_factory, version: int, image_size: int = 224, kv_heads: int | None = None):
    """A tiny checkpoint whose greedy answers vary from token to token (4 query heads; KV heads: `kv_heads`, by
    default 2 for PaliGemma 2 and 1 for PaliGemma 1, as in the real checkpoints).

    hf_factory's weights make the tied LM head echo the last input token forever, which would let a generation
    test pass without generating anything; small embeddings and larger layer weights let the layers decide.
    """
    usual = 2 if version == 2 else 1
    kv_heads = kv_heads or usual
    name = f"gen-pg{version}-{image_size}" + ("" if kv_heads == usual else f"-kv{kv_heads}")
    folder, hf = ckpt_factory(name, version=version, image_size=image_size, kv_heads=kv_heads)
    if not (folder / ".diverse").exists():
        diverse_weights(hf, version * 1000 + image_size)
        hf.save_pretrained(folder)
        (folder / ".diverse").touch()
    return folder, hf


def diverse_weights(model: torch.nn.Module, seed: int) -> None:
    """`diverse`'s weights: small embeddings and larger layer weights, so that the layers decide each token."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            std = 0.05 if "embed_tokens" in n else (1.0 if "norm" in n else (0.5 if p.ndim > 1 else 0.3))
            p.copy_(torch.randn(p.shape, generator=g) * std)
