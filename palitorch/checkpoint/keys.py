"""Hugging Face weight names <-> palitorch parameter names, as data.

Several layouts occur in the wild: checkpoints saved before transformers 4.52 (`language_model.model.*`,
`vision_tower.vision_model.*`, `multi_modal_projector.*`), by 4.52-4.x (`model.language_model.*`,
`model.vision_tower.vision_model.*`, `model.multi_modal_projector.*`, `lm_head.*`), and by 5.x, which writes the
old text names but drops `vision_model.` from the vision tower's. Templates use `{}` for a layer index. This
module is the only place in palitorch that knows these names.
"""

from __future__ import annotations

import re

# HF prefix -> our prefix, for every layout; longer prefixes first, since they are tried in order.
PREFIXES = {
    "model.vision_tower.vision_model.": "vision_tower.",
    "vision_tower.vision_model.": "vision_tower.",
    "model.vision_tower.": "vision_tower.",
    "vision_tower.": "vision_tower.",
    "model.multi_modal_projector.linear.": "projector.",
    "multi_modal_projector.linear.": "projector.",
    "model.language_model.": "language_model.",
    "language_model.model.": "language_model.",
}
EXPORT_PREFIXES = {
    "vision_tower.": "model.vision_tower.vision_model.",
    "projector.": "model.multi_modal_projector.linear.",
    "language_model.": "model.language_model.",
}

# The LM head's names. With tied embeddings (every released PaliGemma) some checkpoints carry it too: the loader
# compares it with the embedding (checkpoint.io._stored_head): a copy is dropped, a head stored alone becomes the
# embedding, a different one unties the model.
LM_HEAD = ("lm_head.weight", "language_model.lm_head.weight")

VISION = {
    "embeddings.patch_embedding.weight": "patch_embedding.weight",
    "embeddings.patch_embedding.bias": "patch_embedding.bias",
    "embeddings.position_embedding.weight": "position_embedding.weight",
    "post_layernorm.weight": "post_layernorm.weight",
    "post_layernorm.bias": "post_layernorm.bias",
    **{
        f"encoder.layers.{{}}.{name}.{p}": f"layers.{{}}.{name}.{p}"
        for name in ("layer_norm1", "layer_norm2", "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                     "self_attn.out_proj", "mlp.fc1", "mlp.fc2")
        for p in ("weight", "bias")
    },
}

PROJECTOR = {"weight": "weight", "bias": "bias"}

_TEXT_COMMON = {
    "embed_tokens.weight": "embed_tokens.weight",
    "norm.weight": "norm.weight",
    "layers.{}.input_layernorm.weight": "layers.{}.input_norm.weight",
    **{f"layers.{{}}.self_attn.{p}_proj.weight": f"layers.{{}}.attn.{p}_proj.weight" for p in "qkvo"},
    **{f"layers.{{}}.mlp.{p}_proj.weight": f"layers.{{}}.mlp.{p}_proj.weight" for p in ("gate", "up", "down")},
}
# Gemma 1 calls its pre-MLP norm `post_attention_layernorm`; Gemma 2 uses that name for the norm after attention.
TEXT_GEMMA1 = {**_TEXT_COMMON, "layers.{}.post_attention_layernorm.weight": "layers.{}.pre_mlp_norm.weight"}
TEXT_GEMMA2 = {
    **_TEXT_COMMON,
    "layers.{}.post_attention_layernorm.weight": "layers.{}.post_attn_norm.weight",
    "layers.{}.pre_feedforward_layernorm.weight": "layers.{}.pre_mlp_norm.weight",
    "layers.{}.post_feedforward_layernorm.weight": "layers.{}.post_mlp_norm.weight",
}

_INDEX = re.compile(r"\.(\d+)\.")


def _table(ours_prefix: str, version: int) -> dict[str, str]:
    if ours_prefix == "vision_tower.":
        return VISION
    if ours_prefix == "projector.":
        return PROJECTOR
    return TEXT_GEMMA2 if version == 2 else TEXT_GEMMA1


def unused(key: str) -> bool:
    """Whether an HF weight is one PaliGemma never uses, skipped when loading: SigLIP's pooling head
    (`vision_tower...head.*`), which transformers builds and saves when a vision_config leaves out
    `vision_use_head: false`, as the Hub's PaliGemma 1 configs do, and the patch positions
    `embeddings.position_ids` (0, 1, 2, ...), and RoPE's `rotary_emb.inv_freq`, buffers older transformers saved."""
    if key.endswith("rotary_emb.inv_freq"):
        return True
    return any(key.startswith(p + "head.") or key == p + "embeddings.position_ids"
               for p, ours in PREFIXES.items() if ours == "vision_tower.")


def hf_to_ours(key: str, version: int) -> str | None:
    """Our parameter name for an HF weight name, or None if the name is not a PaliGemma weight."""
    if key in LM_HEAD:  # an untied head
        return "language_model.lm_head.weight"
    for hf_prefix, ours_prefix in PREFIXES.items():
        if key.startswith(hf_prefix):
            rest = key[len(hf_prefix):]
            m = _INDEX.search(rest)
            template = _INDEX.sub(".{}.", rest, count=1) if m else rest
            ours = _table(ours_prefix, version).get(template)
            if ours is None:
                return None
            return ours_prefix + (ours.format(m.group(1)) if m else ours)
    return None


def ours_to_hf(name: str, version: int) -> str:
    """The HF weight name (newer layout) for one of our parameter names."""
    if name == "language_model.lm_head.weight":
        return "lm_head.weight"
    for ours_prefix, hf_prefix in EXPORT_PREFIXES.items():
        if name.startswith(ours_prefix):
            rest = name[len(ours_prefix):]
            m = _INDEX.search(rest)
            template = _INDEX.sub(".{}.", rest, count=1) if m else rest
            inverse = {v: k for k, v in _table(ours_prefix, version).items()}
            hf = inverse[template]
            return hf_prefix + (hf.format(m.group(1)) if m else hf)
    raise KeyError(name)


# transformers 5 builds the vision tower without its `vision_model.` level: the module paths (which PEFT adapters
# name) differ there from the newer file layout.
RUNTIME_PREFIXES = {"model.vision_tower.vision_model.": "model.vision_tower."}


def hf_runtime_name(name: str, version: int) -> str:
    """The path of one of our parameters in a transformers 5 PaliGemmaForConditionalGeneration (`model.` +
    named_parameters' name): what adapters in PEFT's layout name."""
    hf = ours_to_hf(name, version)
    for old, new in RUNTIME_PREFIXES.items():
        if hf.startswith(old):
            return new + hf[len(old):]
    return hf


def hf_name_as_in(name: str, version: int, seen) -> str:
    """The HF weight name for one of our parameter names, in the layout of the HF names `seen` in a checkpoint
    (where one of them shows the layout of that part), else the newer layout: the name to look for in its files."""
    new = ours_to_hf(name, version)
    for ours_prefix, hf_prefix in EXPORT_PREFIXES.items():
        if name.startswith(ours_prefix) and new.startswith(hf_prefix):
            for prefix, ours in PREFIXES.items():
                if ours == ours_prefix and any(k.startswith(prefix) for k in seen):
                    return prefix + new[len(hf_prefix):]
    return new
