"""What a run trains: the model (from scratch or from a checkpoint), its tokenizer, the trainable parameters, AdamW.

From scratch, a BPE tokenizer is learned from the training texts (palitorch.train.tokenizer) and a small preset is
initialised with N(0, init_std) weights. With `init = DIR` (or when resuming), the folder's weights and tokenizer
are loaded as they are: a real Hub PaliGemma fine-tunes with its own tokenizer.json, and every folder the run writes
gets the folder's tokenizer files and generation_config.json (its generation settings) too.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import math
import re
import shutil
from pathlib import Path

import torch
from torch import nn

from palitorch.checkpoint import load_model, read_config, resolve_dtype
from palitorch.checkpoint.io import check_checkpoint_folder as check_folder
from palitorch.config import small_preset
from palitorch.errors import CheckpointError, ConfigError
from palitorch.inference.inputs import checkpoint_path
from palitorch.inference.processor import Processor
from palitorch.model import PaliGemma
from palitorch.model.gemma import RMSNorm
from palitorch.train.config import SCRATCH_CONTEXT, ModelConfig, OptimConfig, TrainConfig
from palitorch.train.data import Dataset, Example
from palitorch.train.evaluate import cut_answers
from palitorch.train.tokenizer import save_tokenizer, train_tokenizer

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model")
# Copied from the checkpoint into every folder saved: its image preprocessing too (a custom resample or mean/std)
CARRIED_FILES = (*TOKENIZER_FILES, "generation_config.json", "preprocessor_config.json")
# Short names for `train.trainable`; anything else is a glob over parameter names (`language_model.layers.1.*`).
PARTS = {
    "vision": "vision_tower.*",
    "projector": "projector.*",
    "decoder": "language_model.*",
    "embeddings": "language_model.embed_tokens.*",
}
_TASK_TOKENS = re.compile(r"<(loc\d{4}|seg\d{3})>")


def tokenizer_files(folder: Path) -> dict[str, Path]:
    """The tokenizer files (and generation_config.json, preprocessor_config.json) present in a folder, to copy into
    every checkpoint written."""
    return {n: folder / n for n in CARRIED_FILES if (folder / n).is_file()}


def check_checkpoint_folder(folder: Path) -> None:
    """A one-line CheckpointError unless `folder` holds a checkpoint's config.json and tokenizer.json (a Hub id
    gets the line on downloading it)."""
    folder = checkpoint_path(folder)
    check_folder(folder)
    if not (folder / "tokenizer.json").is_file():
        raise CheckpointError(f"{folder} has no tokenizer.json: copy the checkpoint's tokenizer files into it")


def copy_tokenizer(src: Path, dst: Path) -> None:
    """Copy a checkpoint's tokenizer files, generation_config.json and preprocessor_config.json into `dst`, emptied
    first (a file left by an earlier run in the same folder must not travel with this one)."""
    check_checkpoint_folder(src)
    files = tokenizer_files(src)
    shutil.rmtree(dst, ignore_errors=True)
    dst.mkdir(parents=True, exist_ok=True)
    for name, path in files.items():
        shutil.copyfile(path, dst / name)


def learn_tokenizer(examples: list[Example], vocab_size: int, folder: Path, dummy_prefix: bool = False,
                    split_punctuation: bool = False) -> None:
    """Train BPE on the texts exactly as the processor will see them; <loc>/<seg> are tokens already."""
    texts = []
    for e in examples:
        texts += [_TASK_TOKENS.sub(" ", e.prefix + "\n"), _TASK_TOKENS.sub(" ", e.suffix)]
    tok = train_tokenizer(texts, vocab_size=vocab_size, dummy_prefix=dummy_prefix, split_punctuation=split_punctuation)
    shutil.rmtree(folder, ignore_errors=True)  # no file of an earlier run in this folder travels with this one
    save_tokenizer(tok, folder)


def from_scratch(cfg: ModelConfig, tokenizer_dir: Path) -> tuple[PaliGemma, Processor]:
    """A small preset sized to the tokenizer in `tokenizer_dir`, special ids looked up by text."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    ids = {t: tok.token_to_id(t) for t in ("<image>", "<pad>", "<bos>", "<eos>")}
    pg = small_preset(cfg.preset, tok.get_vocab_size(), cfg.version, cfg.image_size, cfg.patch_size)
    context = cfg.max_length or SCRATCH_CONTEXT
    pg = pg.replace(
        text=dataclasses.replace(pg.text, max_position_embeddings=context),
        image_token_id=ids["<image>"], pad_token_id=ids["<pad>"], bos_token_id=ids["<bos>"],
        eos_token_ids=(ids["<eos>"],),
    )
    model = PaliGemma(pg).to(resolve_dtype(cfg.dtype))
    processor = Processor(tok, pg.vision.image_size, pg.num_image_tokens, max_length=context)
    return model, processor


def from_folder(folder: Path, dtype: str, device: torch.device, max_length: int = 0) -> tuple[PaliGemma, Processor]:
    """The checkpoint in `folder`; `max_length` ([model] max_length, 0 = none) is checked to fit its geometry."""
    pg = read_config(folder)
    context, images = pg.text.max_position_embeddings, pg.num_image_tokens
    if max_length and not images < max_length <= context:
        why = f"is over the {context}-token context" if max_length > context else \
            f"leaves no room for text after the {images} image tokens"
        raise ConfigError(f"[model] max_length {max_length} {why} of the checkpoint {folder}: give a value from "
                          f"{images + 1} to {context}, or 0 (its context)")
    processor = Processor.from_folder(folder, pg.vision.image_size, pg.num_image_tokens,
                                      max_length=pg.text.max_position_embeddings)
    return load_model(folder, device=device, dtype=dtype), processor


@torch.no_grad()
def init_weights(model: nn.Module, std: float, seed: int) -> None:
    """N(0, std) matrices, kernels and embeddings; zero biases; norms at identity (Gemma's RMSNorm stores 1 + w)."""
    g = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Conv2d, nn.Embedding)):
            w = module.weight
            w.copy_(torch.randn(w.shape, generator=g, dtype=torch.float32) * std)
            if getattr(module, "bias", None) is not None:
                module.bias.zero_()
        elif isinstance(module, nn.LayerNorm):
            module.weight.fill_(1.0)
            module.bias.zero_()
        elif isinstance(module, RMSNorm):
            module.weight.zero_()


@torch.no_grad()
def smooth_loc_embeddings(model: PaliGemma, loc_ids: list[int], std: float, seed: int) -> None:
    """Give the `<loc0000>`..`<loc1023>` rows of a from-scratch embedding an ordinal code: neighbours alike.

    Row i becomes std * sqrt(2) * cos(2 pi f_j i / 1024 + phase_j) over the hidden dims j, with frequencies f_j
    log-spaced from 1/2 to 64 cycles over the range (the top one resolves 16 bins: one pixel of a 64 px image)
    and random phases. The embedding is also the output layer, so a box coordinate starts as a smooth choice:
    a near miss scores close to a hit, and what is learnt about one bin carries to its neighbours.
    Per-element variance is std^2, as for every other row.
    """
    w = model.language_model.embed_tokens.weight
    g = torch.Generator().manual_seed(seed + 2)
    h = w.shape[1]
    freq = torch.logspace(math.log10(0.5), math.log10(64.0), h, dtype=torch.float64)
    phase = torch.rand(h, generator=g, dtype=torch.float64) * 2 * math.pi
    i = torch.arange(len(loc_ids), dtype=torch.float64)[:, None]
    code = math.sqrt(2) * std * torch.cos(2 * math.pi * freq * i / len(loc_ids) + phase)
    w[torch.tensor(loc_ids)] = code.to(w.dtype)


def matches(name: str, pattern: str) -> bool:
    """Whether parameter `name` is selected by `pattern`: a part name (PARTS) or a glob over names."""
    return fnmatch.fnmatchcase(name, PARTS.get(pattern, pattern))


def check_patterns(model: nn.Module, patterns, what: str) -> None:
    """A one-line ConfigError for the first pattern that selects no parameter (a typo such as "vison")."""
    names = [n for n, _ in model.named_parameters()]
    for pat in patterns:
        if not any(matches(n, pat) for n in names):
            raise ConfigError(f"{what} {pat!r} matches no parameter; use {', '.join(PARTS)} or a glob over names "
                              f"such as {names[0]!r}")


def set_trainable(model: nn.Module, patterns: list[str], extra: list[str] = (),
                  what: str = "[train] trainable pattern") -> list[str]:
    """Freeze every parameter not matched by `patterns` or `extra` (part names or globs); returns the trainable names.
    Each of `extra`, or of `patterns` when no `extra` is given, must match something (else a ConfigError on `what`)."""
    check_patterns(model, extra or patterns, what)
    patterns = [*patterns, *extra]
    chosen = []
    for n, p in model.named_parameters():
        p.requires_grad_(any(matches(n, pat) for pat in patterns))
        if p.requires_grad:
            chosen.append(n)
    return chosen


def lr_scale_of(name: str, scales: dict[str, float]) -> float:
    """The `[optim] lr_scale` multiplier of one parameter: the first key (part name or glob) matching it, else 1."""
    return next((float(s) for key, s in scales.items() if matches(name, key)), 1.0)


def optimizer(model: nn.Module, cfg: OptimConfig) -> tuple[torch.optim.AdamW, list[str]]:
    """AdamW over the trainable parameters: decay on tensors with ndim >= 2, none on biases and norm scales.

    One parameter group per (decay, `lr_scale` multiplier); each group's "lr_scale" is applied by the loop on top of
    the schedule. Returns the optimizer and the parameter names in optimizer order (the key of its saved state).
    """
    check_patterns(model, cfg.lr_scale, "[optim] lr_scale key")
    groups: dict[tuple[bool, float], list] = {}
    for n, p in model.named_parameters():
        if p.requires_grad:
            groups.setdefault((p.ndim >= 2, lr_scale_of(n, cfg.lr_scale)), []).append((n, p))
    if not groups:
        raise ConfigError("[train] trainable selects no parameters: nothing would train")
    order = sorted(groups, key=lambda k: (not k[0], -k[1]))  # decayed first (as before lr_scale existed)
    params = [{"params": [p for _, p in groups[k]], "weight_decay": cfg.weight_decay if k[0] else 0.0,
               "lr_scale": k[1]} for k in order]
    names = [n for k in order for n, _ in groups[k]]
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)
    return opt, names


def lr_at(step: int, total: int, cfg: OptimConfig, lr: float | None = None, warmup: int | None = None) -> float:
    """The learning rate of update `step` (0-based): linear warm-up to `lr`, then cosine / linear / constant."""
    lr = cfg.lr if lr is None else lr
    warmup = cfg.warmup_steps if warmup is None else warmup
    if step < warmup:
        return lr * (step + 1) / warmup
    if cfg.schedule == "constant":
        return lr
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    shape = 0.5 * (1 + math.cos(math.pi * progress)) if cfg.schedule == "cosine" else 1 - progress
    return lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * shape)


def warnings(cfg: TrainConfig, model: nn.Module, eval_data: Dataset | None) -> list[str]:
    """What a run's config does that its author may not expect: settings it ignores, trainable weights whose
    updates round away, eval answers cut short."""
    out = []
    if ignored := cfg.ignored():
        out.append(f"[model] {', '.join(ignored)}: for a model built from scratch; ignored with init, whose "
                   "checkpoint decides them")
    low = sum(p.numel() for p in model.parameters() if p.requires_grad and p.dtype != torch.float32)
    if low:  # (bfloat16's 8-bit mantissa: most AdamW steps are below half its spacing)
        out.append(f"{low:,} trainable parameters are stored in {cfg.model.dtype}, where small updates round away: "
                   "for float32 master weights set [model] dtype = \"float32\" (with [train] bf16 = true for bfloat16 "
                   "compute)")
    if eval_data is not None and (cut := cut_answers(eval_data.targets - 1, cfg.eval.max_new_tokens)):  # (- <eos>)
        out.append(cut)
    return out


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(all, trainable) parameter counts."""
    total = sum(p.numel() for p in model.parameters())
    return total, sum(p.numel() for p in model.parameters() if p.requires_grad)
