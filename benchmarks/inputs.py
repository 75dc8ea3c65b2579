"""What the benchmarks run: a batch of easy-VQA-like inputs, and checkpoint folders of the benchmark sizes.

Sizes: `bundled` (the bundled easy-VQA model; random weights of its shape if it is absent), `mid` (~200M
parameters, PaliGemma 1's decoder), `pg2-mid` (the same size with PaliGemma 2's decoder: soft-caps, sliding window,
extra norms, two query heads per KV head), `pg1-3b` / `pg2-3b` (the real 3B shapes, random weights), `pg1-mini` /
`pg2-mini` (the real vocab, masks, soft-caps and 256 image tokens, at a size any CPU runs). Or the path of a
checkpoint folder in the Hub's layout (real weights: e.g. a downloaded google/paligemma-3b-pt-224), used as it is.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import palitorch  # noqa: E402
from palitorch.checkpoint import save_model  # noqa: E402
from palitorch.config import PaliGemmaConfig, TextConfig, VisionConfig, preset  # noqa: E402
from palitorch.model import PaliGemma  # noqa: E402
from palitorch.train.tokenizer import save_tokenizer, train_tokenizer  # noqa: E402

PROMPT = "answer en what color is the shape in the image?"
PROMPTS = [PROMPT, "caption en", "answer en is the shape a circle?", "detect circle", "answer en what color is it?"]
COLORS = [(200, 30, 30), (30, 150, 40), (40, 60, 200), (220, 190, 30), (130, 40, 160), (90, 90, 90), (230, 120, 20)]


def workload(batch: int) -> tuple[list, list[str]]:
    """`batch` different inputs: a coloured circle or square on white (easy-VQA's kind of image), at varying
    places, each with one of a few prompts of different lengths."""
    from PIL import Image, ImageDraw

    images = []
    for i in range(batch):
        image = Image.new("RGB", (64, 64), "white")
        draw = ImageDraw.Draw(image)
        box = (6 + 3 * (i % 5), 8 + 4 * (i % 3), 40 + 4 * (i % 4), 44 + 5 * (i % 3))
        (draw.ellipse if i % 2 else draw.rectangle)(box, fill=COLORS[i % len(COLORS)])
        images.append(image)
    return images, [PROMPTS[i % len(PROMPTS)] for i in range(batch)]


def _tokenizer():
    words = ["caption en", "answer en what color is the shape in the image?", "detect circle", "a red circle"]
    return train_tokenizer(words * 20, vocab_size=300)


# The mid size's dimensions, shared by `mid` (PaliGemma 1's decoder, one KV head) and `pg2-mid`.
MID_TEXT = dict(hidden_size=1024, intermediate_size=4096, num_layers=12, num_heads=8, head_dim=128)
MID_VISION = dict(hidden_size=512, intermediate_size=2048, num_layers=6, num_heads=8)


def _config(size: str, tok) -> PaliGemmaConfig:
    image_id = tok.token_to_id("<image>")
    if size == "mid":
        cfg = PaliGemmaConfig(
            vision=VisionConfig(image_size=224, patch_size=14, **MID_VISION),
            text=TextConfig(vocab_size=tok.get_vocab_size(), num_kv_heads=1, **MID_TEXT),
        )
    elif size == "bundled":
        from palitorch.config import _tiny

        cfg = _tiny(tok.get_vocab_size())
    else:
        family, _, scale = size.partition("-")
        cfg = preset({"pg1": "paligemma-3b-224", "pg2": "paligemma2-3b-224"}[family])
        if scale == "mini":  # the real vocab, masks, soft-caps and 256 image tokens, at a size any CPU runs
            n = 2
            text = dataclasses.replace(
                cfg.text, hidden_size=256, intermediate_size=512, num_layers=n, num_heads=4,
                num_kv_heads=min(cfg.text.num_kv_heads, 2), head_dim=64,
                query_pre_attn_scalar=64 if cfg.text.query_pre_attn_scalar else None,
                layer_types=cfg.text.layer_types and cfg.text.layer_types[:n])
            vision = dataclasses.replace(cfg.vision, hidden_size=128, intermediate_size=256, num_layers=2, num_heads=2)
            cfg = cfg.replace(text=text, vision=vision)
        elif scale == "mid":  # PaliGemma 2's soft-caps, sliding window, extra norms and GQA at the `mid` size
            n = MID_TEXT["num_layers"]
            text = dataclasses.replace(
                cfg.text, vocab_size=tok.get_vocab_size(), num_kv_heads=4, query_pre_attn_scalar=MID_TEXT["head_dim"],
                layer_types=cfg.text.layer_types and cfg.text.layer_types[:n], **MID_TEXT)
            cfg = cfg.replace(text=text, vision=dataclasses.replace(cfg.vision, **MID_VISION))
    return cfg.replace(image_token_id=image_id)


SIZES = ("bundled", "mid", "pg2-mid", "pg1-3b", "pg2-3b", "pg1-mini", "pg2-mini")


def check_size(size: str) -> str | None:
    """None if `size` names a benchmark size or a checkpoint folder, else what is wrong with it (one line)."""
    if size in SIZES or (Path(size) / "config.json").is_file():
        return None
    if Path(size).is_dir():
        return f"{size!r} is a folder without a config.json: give a checkpoint folder in the Hub's layout"
    return f"unknown size {size!r}: give one of {', '.join(SIZES)}, or the path of a checkpoint folder"


WEIGHTS_VERSION = 3  # part of the folder name: random weights made by an older `randomize` are not reused
DECODER_GAIN, EMBED_STD, LOGIT_STD = 1.75, 0.05, 2.0


@torch.no_grad()
def randomize(model: PaliGemma) -> None:
    """Random weights whose greedy answers depend on the image, the prompt and the step, so that comparing two
    implementations' tokens tests something, yet not so chaotic that bfloat16 rounding decides them.

    With the tied LM head, a token's own embedding in the residual stream gives that token a logit about sqrt(H)
    times its share of the final state above the rest: unless the layers outweigh the embeddings many times over,
    every answer repeats the prompt's last token ("\\n") with log-probability 0 (the weights of sessions 5-8 did,
    at every size but the bundled one). So: embeddings of std EMBED_STD / sqrt(H) (EMBED_STD in the residual,
    after Gemma's sqrt(H) scale); decoder matrices of std DECODER_GAIN / sqrt(fan-in); a final norm that brings
    the logits back to std ~LOGIT_STD (Gemma's norms scale by 1 + weight); other norms N(0, 0.1) (the default
    init leaves Gemma's at zero). A larger gain gives more varied answers but amplifies rounding: at gain 3, 18
    layers in bfloat16 moved a chosen token's log-probability by 4 nats against float32; at 1.75 (and logits of
    std 2) by at most 0.17 on the real 3B shapes, with 4-9 distinct tokens in 10 per answer. See BENCHMARKS.md."""
    text = model.cfg.text
    for name, p in model.named_parameters():
        if p.ndim == 1 and "norm" in name:
            p.normal_(0, 0.1)
        elif name.startswith("language_model.layers.") and p.ndim == 2:
            p.normal_(0, DECODER_GAIN / p.shape[1] ** 0.5)
    model.language_model.embed_tokens.weight.normal_(0, EMBED_STD / text.hidden_size**0.5)
    model.language_model.norm.weight.normal_(LOGIT_STD / EMBED_STD - 1, 1)


def checkpoint(size: str, workdir: Path, device: str, dtype: torch.dtype) -> tuple[Path, str]:
    """A folder for `size`: a checkpoint folder's path as it is; the bundled model if asked for and present; else
    random weights of that shape, made on `device` (a 3B model initialises in seconds on a GPU, minutes on a CPU)
    and saved in `dtype`."""
    if size not in SIZES and (Path(size) / "config.json").is_file():
        return Path(size), "checkpoint folder"
    if size == "bundled":
        try:
            return palitorch.default_model_path(), "bundled model"
        except palitorch.PalitorchError:
            pass
    folder = workdir / f"{size}-{str(dtype).removeprefix('torch.')}-w{WEIGHTS_VERSION}"
    if not (folder / "config.json").exists():
        tok = _tokenizer()
        cfg = _config(size, tok)
        torch.manual_seed(0)
        with torch.device(device):
            model = PaliGemma(cfg)
        randomize(model)
        model.to(dtype)
        tok_dir = workdir / f"{size}-tok"
        save_tokenizer(tok, tok_dir)
        save_model(model, folder, extra_files={f: tok_dir / f for f in
                                               ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")},
                   max_shard_bytes=2_000_000_000)
        del model
    return folder, "random weights"


def transformers_dequantized(folder: Path, dtype: torch.dtype, device: torch.device):
    """transformers' PaliGemma read from `folder`, with every language-model weight replaced by the int8 weight that
    `palitorch.load(folder, quantize="int8")` computes with, dequantized (quantize_rows is deterministic: the same
    float weights give the same int8 values and scales). Its own copy of the weights: palitorch's are int8."""
    from transformers import PaliGemmaForConditionalGeneration as HF

    from palitorch.model.quant import dequantized, quantize_rows

    hf = HF.from_pretrained(folder, dtype=dtype)
    with torch.no_grad():
        for module in hf.model.language_model.modules():
            if isinstance(module, (torch.nn.Linear, torch.nn.Embedding)):
                module.weight.copy_(dequantized(*quantize_rows(module.weight), module.weight.dtype))
    return hf.to(device).eval()
