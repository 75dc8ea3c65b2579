"""The training configuration: one dataclass per TOML section, loaded from a file and overridden from the command line.

    [model]                     # what to train
    preset = "tiny"             # a from-scratch shape (palitorch.config.SMALL_PRESETS) ...
    init = ""                   # ... or a Hub-layout checkpoint folder to fine-tune (its tokenizer is reused)
    revision = ""               # (init a cached Hub id: its branch, tag or commit; "" = main)
    [data]
    train = ["data/easyvqa/train.jsonl"]
    eval = "data/easyvqa/test.jsonl"
    [train]
    out = "runs/easyvqa"
    steps = 1000
    [optim]
    lr = 1e-3

Every field can be overridden as `--section.key value` (`--optim.lr 3e-4 --train.steps 100`). Values are read as TOML
literals when they parse as one (`--data.task_repeat '{caption = 4}'`), else as plain strings; lists also accept
`a,b,c`. Relative paths are resolved against the current directory, like any command-line path.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path

from palitorch.checkpoint.hub import find_checkpoint
from palitorch.config import SMALL_PRESETS
from palitorch.errors import ConfigError
from palitorch.tasks.metrics import METRICS
from palitorch.train.config_values import coerce, parse_overrides, toml_value
from palitorch.train.runfolder import check_out_folder

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


@dataclass
class ModelConfig:
    preset: str = "tiny"  # from-scratch shape: tiny / small / base (see palitorch.config.SMALL_PRESETS)
    init: str = ""  # a Hub-layout checkpoint folder (or a cached Hub id) to fine-tune instead of building from scratch
    revision: str = ""  # with init a Hub id: the cached branch, tag or commit ("" = main); recorded as its snapshot
    version: int = 1  # 1: Gemma decoder (PaliGemma 1); 2: Gemma 2 decoder (PaliGemma 2)
    image_size: int = 64
    patch_size: int = 8
    vocab_size: int = 1024  # BPE pieces learned from the training texts (plus the 256 bytes and specials)
    dummy_prefix: bool = False  # tokenizer: "▁" before every word, the first too, so a word is one token anywhere
    split_punctuation: bool = False  # tokenizer: "\n" and ?.,!;: always separate pieces (no "image?\n" merges)
    max_length: int = 0  # tokens per example, image ones too: scratch: the context (0 = 512); init: a cap (0 = none)
    init_std: float = 0.02  # from-scratch weights ~ N(0, init_std); biases 0, norms at identity
    smooth_locs: bool = False  # from scratch: <loc> embeddings start as an ordinal code (neighbouring bins alike)
    dtype: str = "float32"  # parameter dtype; float32 master weights unless memory forces bfloat16


@dataclass
class DataConfig:
    train: list[str] = field(default_factory=list)  # JSONL files of {"image", "prefix", "suffix"}
    eval: str = ""  # held-out JSONL for evaluation (optional)
    task_repeat: dict[str, int] = field(default_factory=dict)  # e.g. {caption = 4}: copies per epoch by "task"
    # From step `late_from` on (0 = never), the mix changes: `late_task_repeat` overrides task_repeat's entries,
    # e.g. {detect = 8} once the questions are learnt. Its data order is a pure function of seed and step too.
    late_from: int = 0
    late_task_repeat: dict[str, int] = field(default_factory=dict)
    # Decode the run's images before step 1 and keep them in memory (3 * S * S bytes each, per process); false: decode
    # each batch's on threads, one step ahead (headers checked at startup)
    cache_images: bool = True
    # Examples of one image kept together in a batch, so the vision tower runs once for all of them (1 = off; the
    # easy-VQA questions come ~10 per image, and 4 per batch cut the vision work per step ~4x). Examples about
    # several images are kept together by their list of images.
    per_image: int = 1


@dataclass
class AugmentConfig:
    """Photometric jitter only, per image and uniform in [1 - x, 1 + x]. Off by default.

    Geometric changes (flips, crops, shifts) are never applied: they would silently invalidate <loc> boxes and
    left/right wording. Saturation can turn a grey into a colour and back; keep it off when answers name colours.
    """

    brightness: float = 0.0
    contrast: float = 0.0
    saturation: float = 0.0
    noise: float = 0.0  # std of Gaussian pixel noise, on the [0, 1] scale


@dataclass
class TrainSection:
    out: str = "runs/run"  # run folder: checkpoints, metrics.jsonl, the final model
    steps: int = 0  # optimizer steps; 0 = derived from `epochs`
    epochs: float = 1.0  # used when steps is 0
    batch_size: int = 64  # the GLOBAL batch: examples per optimizer step, over all processes
    micro_batch_size: int = 0  # examples per forward pass and process; 0 = the whole per-process share
    trainable: list[str] = field(default_factory=lambda: ["vision", "projector", "decoder"])  # or name globs
    seed: int = 0
    device: str = "auto"  # auto (cuda if available), cpu, cuda
    bf16: bool = False  # bfloat16 autocast for the forward pass (weights and optimizer stay float32)
    gradient_checkpointing: bool = False
    log_every: int = 10  # steps between metrics.jsonl rows
    progress: bool = True  # a tqdm bar on the first process


@dataclass
class OptimConfig:
    """AdamW with decoupled weight decay on matrices (ndim >= 2: linear and conv kernels, embeddings) only.

    Biases and norm scales are not decayed: decay would pull them towards 0, which for a LayerNorm scale means
    switching the feature off. Embeddings are decayed like matrices because the token embedding is also the output
    layer (tied LM head), where decay keeps the logits' scale in check.
    """

    lr: float = 1e-3
    weight_decay: float = 0.05
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    warmup_steps: int = 200  # linear from 0 to lr
    schedule: str = "cosine"  # cosine / linear / constant, after the warm-up
    min_lr_ratio: float = 0.0  # the schedule ends at lr * min_lr_ratio
    clip_grad_norm: float = 1.0  # 0 = no clipping
    # Per-part multipliers of lr, e.g. {vision = 0.1}: keys are part names (vision, projector, decoder, embeddings)
    # or globs over parameter names; the first key that matches a parameter wins, the rest train at 1x.
    lr_scale: dict[str, float] = field(default_factory=dict)


@dataclass
class EvalConfig:
    every: int = 0  # steps between evaluations; 0 = only at the end
    max_examples: int = 0  # a fixed random subset of the held-out JSONL for periodic evaluations; 0 = all
    final_max_examples: int = 0  # the same for the evaluation after the last step; 0 = all
    batch_size: int = 64
    max_new_tokens: int = 32  # as `palitorch eval`'s default; a warning names answers longer than this
    group_by: list[str] = field(default_factory=lambda: ["task", "qtype"])  # JSONL fields to report accuracy by
    # what answers are measured by (tasks/metrics.py): exact, vqa, anls, relaxed, cider
    metrics: list[str] = field(default_factory=lambda: ["exact"])
    vae: str = ""  # big_vision's vae-oid.npz: segmentation answers' masks scored too (mask_iou), as `eval --vae`


@dataclass
class CheckpointConfig:
    every: int = 0  # steps between checkpoints; 0 = only at the end
    keep: int = 2  # newest checkpoints kept (older ones deleted)
    # a metric the evaluations report (exact_match, vqa_accuracy, anls, relaxed_accuracy, cider; eval_loss, lower is
    # better; mask_iou with [eval] vae): the model with the best figure is kept in RUN/best (train/best.py); "" = none
    best: str = ""


@dataclass
class WarmstartConfig:
    """Pre-train the vision tower alone before the main loop, as an image classifier (off when epochs is 0).

    The labels come from the training examples whose prefix is `prefix`: word k of the suffix is the class of
    classifier head k, one linear head per word position on the mean-pooled vision output (for captions
    "<colour> <shape>" that is a colour and a shape classifier). The heads are thrown away afterwards.
    With `boxes` (a prefix such as "detect"), every patch token also learns which of its pixels lie inside the
    boxes of that image's detection answers (a per-token linear head), so the tower reads box edges to the pixel.
    With `box_edges` too, every patch token also classifies the four edges of the image's first box (in pixels,
    0..S), so that each token carries where the whole box is, not only which of its own pixels it covers.
    """

    epochs: float = 0.0
    prefix: str = "caption en"
    boxes: str = ""  # prefix of detection examples whose boxes teach per-pixel box masks; "" = off
    box_edges: bool = False  # with boxes: every patch token also names the image's box edges (y0 x0 y1 x1, px)
    box_edges_weight: float = 1.0  # that loss's weight against the classifiers' and the box masks'
    lr: float = 1e-3
    batch_size: int = 64
    warmup_steps: int = 20


@dataclass
class LoraConfig:
    """LoRA fine-tuning (palitorch.train.lora), off while rank is 0; it needs [model] init. [train] trainable is then
    replaced by the adapters plus `also_train` (the same part names or globs)."""

    rank: int = 0
    alpha: float = 16.0  # the update is scaled by alpha / rank
    dropout: float = 0.0  # on the adapters' input
    targets: list[str] = field(default_factory=lambda: ["language_model.layers.*"])  # globs over linear layers' names
    also_train: list[str] = field(default_factory=list)  # trained in full beside the adapters, e.g. ["projector"]


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    train: TrainSection = field(default_factory=TrainSection)
    optim: OptimConfig = field(default_factory=OptimConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    warmstart: WarmstartConfig = field(default_factory=WarmstartConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_toml(self) -> str:
        """The resolved configuration as TOML (written into the run folder and by `--print-config`)."""
        lines = []
        for sec, values in self.to_dict().items():
            lines.append(f"[{sec}]")
            lines += [f"{k} = {toml_value(v)}" for k, v in values.items()]
            lines.append("")
        return "\n".join(lines)

    def ignored(self) -> list[str]:
        """The [model] keys set to other than their defaults that this run does not read: with init, the
        checkpoint decides what they describe (its resolution, version, tokenizer)."""
        m, default = self.model, ModelConfig()
        return [k for k in SCRATCH_ONLY if getattr(m, k) != getattr(default, k)] if m.init else []

    def validate(self) -> None:
        """Every value in its range (LIMITS) and consistent with the others; else a one-line ConfigError."""
        for sec, limits in LIMITS.items():
            for name, (rule, ok) in limits.items():
                v = getattr(getattr(self, sec), name)
                if isinstance(v, float) and not math.isfinite(v):
                    raise ConfigError(f"[{sec}] {name} must be a finite number, got {v}")
                if not ok(v):
                    raise ConfigError(f"[{sec}] {name} must be {rule}, got {v!r}")
        m, d, t, o = self.model, self.data, self.train, self.optim
        if not d.train:
            raise ConfigError("[data] train is empty: give at least one training JSONL file")
        if t.steps == 0 and t.epochs == 0:
            raise ConfigError("[train] give steps > 0 or epochs > 0")
        check_out_folder(t.out)
        if o.schedule not in ("cosine", "linear", "constant"):
            raise ConfigError(f"[optim] schedule {o.schedule!r} is not one of cosine, linear, constant")
        if t.device not in ("auto", "cpu", "cuda"):
            raise ConfigError(f"[train] device {t.device!r} is not one of auto, cpu, cuda")
        if m.preset not in SMALL_PRESETS:
            raise ConfigError(f"[model] preset {m.preset!r} is not one of {', '.join(SMALL_PRESETS)}")
        if m.dtype.lower() not in TRAIN_DTYPES:
            raise ConfigError(f"[model] dtype {m.dtype!r} is not one of float32, bfloat16 (float16 weights need the "
                              "loss scaling that training does not do: their updates underflow into NaN)")
        if m.image_size % m.patch_size:
            raise ConfigError(f"[model] image_size {m.image_size} is not a multiple of patch_size {m.patch_size}")
        tokens = (m.image_size // m.patch_size) ** 2  # with init, build.from_folder checks the checkpoint's
        if not m.init and (m.max_length or SCRATCH_CONTEXT) <= tokens:
            raise ConfigError(f"[model] max_length {m.max_length or SCRATCH_CONTEXT} leaves no room for text after "
                              f"the {tokens} image tokens: raise it, or use larger patches")
        for name in ("task_repeat", "late_task_repeat"):
            for k, v in getattr(d, name).items():
                if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                    raise ConfigError(f"[data] {name}.{k} must be a whole number >= 0, got {v!r}")
        if d.late_from > 0 and not d.late_task_repeat:
            raise ConfigError("[data] a late_from > 0 needs a late_task_repeat table")
        if self.lora.rank and not m.init:
            raise ConfigError("[lora] rank > 0 fine-tunes a checkpoint: give [model] init")
        if self.lora.rank and self.warmstart.epochs:
            raise ConfigError("[warmstart] trains the vision tower in full: not with [lora] rank > 0")
        if self.lora.rank and t.trainable != TrainSection().trainable:
            raise ConfigError("[lora] rank > 0 trains the adapters: name other parts to train in [lora] also_train, "
                              "not [train] trainable (configs/finetune-lora.toml is a LoRA config)")
        for k, v in o.lr_scale.items():
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v < math.inf:
                raise ConfigError(f"[optim] lr_scale.{k} must be a finite number >= 0, got {v!r}")
        if taken := [g for g in self.eval.group_by if g in METRIC_NAMES]:
            raise ConfigError(f"[eval] group_by {taken[0]!r} is the name of an overall metric: group by other fields")
        if wrong := metric_error(self.eval.metrics):
            raise ConfigError(f"[eval] metrics: {wrong}")
        if self.eval.vae and not Path(self.eval.vae).is_file():
            raise ConfigError(f"[eval] vae {self.eval.vae!r} is not a file: give the path of vae-oid.npz, or \"\"")
        if best := self.checkpoint.best:
            reported = [METRICS[m] for m in self.eval.metrics] + ["eval_loss"] + ["mask_iou"] * bool(self.eval.vae)
            if best not in reported:
                raise ConfigError(f"[checkpoint] best {best!r} is not a metric this run's evaluations report: one of "
                                  f"{', '.join(reported)} (or add its measure to [eval] metrics, or [eval] vae for "
                                  "mask_iou)")
            if not d.eval or not self.eval.every:
                raise ConfigError("[checkpoint] best compares periodic evaluations: give [data] eval and [eval] "
                                  "every > 0")


# [model] keys that only a from-scratch model reads (with init, the checkpoint decides): ignored beside init, with a
# warning (build.warnings); a resume refuses a change to them (continuation.check_model).
SCRATCH_ONLY = ("preset", "version", "image_size", "patch_size", "vocab_size", "dummy_prefix", "split_punctuation",
                "init_std", "smooth_locs")

# What an evaluation reports beside its groups (train/evaluate.py): no group may take these names.
METRIC_NAMES = frozenset({"n", "boxes", "segments", "mask_iou", "eval_loss", "step", *METRICS.values()})


def metric_error(names: list) -> str | None:
    """What is wrong with a list of metric names (none, an unknown or repeated one), else None."""
    if not names:
        return f"name at least one of {', '.join(METRICS)}"
    for name in names:
        if name not in METRICS:
            near = difflib.get_close_matches(str(name), list(METRICS), n=1)
            return f"unknown metric {name!r}" + (f" (did you mean {near[0]!r}?)" if near else "") + \
                f"; the metrics are {', '.join(METRICS)}"
    if len(set(names)) < len(names):
        return f"{next(n for n in names if names.count(n) > 1)!r} is named twice"
    return None

# The range of every number in the config, as (rule, test); a float must be finite too. Checked by validate.
_GE0 = (">= 0", lambda v: v >= 0)
_GE1 = (">= 1", lambda v: v >= 1)
_POSITIVE = ("> 0", lambda v: v > 0)
_FRACTION = ("between 0 and 1", lambda v: 0 <= v <= 1)
_BETA = (">= 0 and < 1", lambda v: 0 <= v < 1)
LIMITS = {
    "model": {"version": ("1 or 2", lambda v: v in (1, 2)), "image_size": _GE1, "patch_size": _GE1,
              "vocab_size": _GE0, "max_length": _GE0, "init_std": _POSITIVE},
    "data": {"late_from": _GE0, "per_image": _GE1},
    "augment": {"brightness": _FRACTION, "contrast": _FRACTION, "saturation": _FRACTION, "noise": _GE0},
    "train": {"steps": _GE0, "epochs": _GE0, "batch_size": _GE1, "micro_batch_size": _GE0,
              "seed": ("between 0 and 2**32 - 1", lambda v: 0 <= v < 2**32), "log_every": _GE1},
    "optim": {"lr": _POSITIVE, "weight_decay": _GE0, "beta1": _BETA, "beta2": _BETA, "eps": _POSITIVE,
              "warmup_steps": _GE0, "min_lr_ratio": _FRACTION, "clip_grad_norm": (">= 0 (0 = no clipping)", _GE0[1])},
    "eval": {"every": _GE0, "max_examples": _GE0, "final_max_examples": _GE0, "batch_size": _GE1,
             "max_new_tokens": _GE1},
    "checkpoint": {"every": _GE0, "keep": _GE1},
    "lora": {"rank": _GE0, "alpha": _POSITIVE, "dropout": ("between 0 and 1 (not 1)", lambda v: 0 <= v < 1)},
    "warmstart": {"epochs": _GE0, "box_edges_weight": _GE0, "lr": _POSITIVE, "batch_size": _GE1,
                  "warmup_steps": _GE0},
}


# Parameter dtypes training runs in (as palitorch.checkpoint.resolve_dtype spells them).
TRAIN_DTYPES = ("float32", "fp32", "bfloat16", "bf16")
SCRATCH_CONTEXT = 512  # a from-scratch model's context when [model] max_length is 0


SECTIONS = {f.name: f.default_factory for f in dataclasses.fields(TrainConfig)}


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> TrainConfig:
    """Read a TOML file (or start from the defaults) and apply `--section.key value` overrides."""
    raw: dict = {}
    if path is not None:
        p = Path(path)
        if p.is_dir():
            raise ConfigError(f"training config {str(p)!r} is a folder: give a .toml file")
        if not p.exists():
            raise ConfigError(f"training config {str(p)!r} does not exist")
        try:
            raw = tomllib.loads(p.read_text(encoding="utf-8"))
        except UnicodeDecodeError:
            raise ConfigError(f"{p} is not UTF-8 text: give a TOML file saved as UTF-8") from None
        except OSError as e:
            raise ConfigError(f"cannot read {p}: {e.strerror or e}") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{p} is not valid TOML: {e}") from None
    cfg = TrainConfig()
    for sec, values in raw.items():
        if not isinstance(values, dict) and sec not in SECTIONS:
            homes = [f"[{s}]" for s in SECTIONS if sec in typing.get_type_hints(SECTIONS[s])]
            where = f": put it under {' or '.join(homes)}" if homes else f" such as [train]; sections are: " \
                f"{', '.join(SECTIONS)}"
            raise ConfigError(f"top-level key {sec!r} must be inside a section{where}")
        if sec not in SECTIONS:
            raise ConfigError(f"unknown section [{sec}]; sections are: {', '.join(SECTIONS)}")
        if not isinstance(values, dict):
            raise ConfigError(f"{sec} must be a [section] table")
        for key, value in values.items():
            _set(cfg, sec, key, value, from_text=False)
    for key, value in parse_overrides(overrides or []):
        sec, _, name = key.partition(".")
        if sec not in SECTIONS or not name:
            raise ConfigError(f"override --{key}: write it as --section.key with a section from {', '.join(SECTIONS)}")
        _set(cfg, sec, name, value, from_text=True)
    # "~/runs/x" as a shell would read it (a TOML value is not expanded by one: a folder named "~" was made)
    cfg.model.init, cfg.data.eval, cfg.train.out = (os.path.expanduser(p) if p else p
                                                    for p in (cfg.model.init, cfg.data.eval, cfg.train.out))
    cfg.data.train = [os.path.expanduser(p) for p in cfg.data.train]
    if cfg.model.revision and not cfg.model.init:
        raise ConfigError(f"[model] revision {cfg.model.revision!r} applies to an init given as a Hub id: set [model] "
                          "init = \"OWNER/NAME\", or leave revision out")
    if cfg.model.init:
        # A Hub id becomes its cached snapshot folder, whose name is the commit: the resolved config.toml records
        # that folder and no revision, so it loads again as written.
        cfg.model.init = str(find_checkpoint(cfg.model.init, cfg.model.revision or None))
        cfg.model.revision = ""
    cfg.validate()
    return cfg


def _set(cfg: TrainConfig, sec: str, key: str, value, from_text: bool) -> None:
    section = getattr(cfg, sec)
    hints = typing.get_type_hints(type(section))
    if key not in hints:
        raise ConfigError(f"[{sec}] has no field {key!r}; fields are: {', '.join(hints)}")
    setattr(section, key, coerce(hints[key], value, f"{sec}.{key}", from_text))
