"""Checkpoints: a Hub-layout model folder plus the training state, written atomically, the newest K kept.

    RUN/checkpoint-0000500/
        config.json  model.safetensors  preprocessor_config.json  tokenizer.json ...   (palitorch.load, transformers)
        trainer_state.json       step, epoch, seed, batch size, data fingerprint, schedule, resolved config,
                                 the sums of the metrics row in progress (log_window)
        optimizer.safetensors    AdamW moments per parameter name ("<name>::exp_avg", "<name>::exp_avg_sq", ...)
        rng_state.safetensors    torch (and CUDA) generator states of every process, as uint8 tensors

Nothing is pickled: tensors go to safetensors and scalars to JSON. The whole folder is built under a temporary name
and renamed into place (palitorch.checkpoint.save_model), so a crash never leaves a half-written checkpoint; an old
one is renamed away before it is deleted. A checkpoint damaged afterwards (a full disk, a copy cut short) is found by
`read`, which checks every file before a resume uses it.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from palitorch.checkpoint import save_model
from palitorch.checkpoint.io import check_safetensors, read_json_object, weight_files, write_safetensors
from palitorch.errors import CheckpointError, NumericsError
from palitorch.model import PaliGemma
from palitorch.train import ddp, lora

PREFIX = "checkpoint-"
STATE_FILES = ("trainer_state.json", "optimizer.safetensors", "rng_state.safetensors")
_NAME = re.compile(rf"{PREFIX}(\d+)")


def checkpoints(run: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints of a run folder, oldest first (half-written ones carry a temporary name)."""
    out = []
    for p in run.glob(f"{PREFIX}*"):
        m = _NAME.fullmatch(p.name)
        if m and all((p / f).is_file() for f in ("config.json", *STATE_FILES)):
            out.append((int(m.group(1)), p))
    return sorted(out)


def rng_tensors(d: ddp.Dist, device: torch.device) -> dict[str, torch.Tensor]:
    """Every process's generator states (collective: all processes must call it)."""
    states = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        states["cuda"] = torch.cuda.get_rng_state(device)
    out = {}
    for k, t in states.items():
        moved = t.to(device) if device.type == "cuda" else t  # nccl gathers device tensors only
        for r, g in enumerate(ddp.gather_tensor(moved, d)):
            out[f"{k}.rank{r}"] = g.cpu()
    return out


def restore_rng(saved: Saved, d: ddp.Dist, device: torch.device) -> None:
    t = saved.rng
    if f"torch.rank{d.rank}" in t:  # a run resumed on more processes than it had: new ranks keep their seed
        torch.set_rng_state(t[f"torch.rank{d.rank}"])
    if device.type == "cuda" and f"cuda.rank{d.rank}" in t:
        torch.cuda.set_rng_state(t[f"cuda.rank{d.rank}"], device)


def save(run: Path, step: int, model: PaliGemma, opt: torch.optim.Optimizer, names: list[str],
         state: dict, rng: dict[str, torch.Tensor], extra_files: dict[str, Path], keep: int,
         base: str | None = None) -> Path:
    """Write RUN/checkpoint-<step> (first process only) and delete all but the newest `keep` checkpoints. `base`:
    the run's [model] init, named by a LoRA run's PEFT files."""
    tmp = Path(tempfile.mkdtemp(prefix=".state.", dir=run))
    try:
        tensors, meta = optimizer_state(opt, names)
        write_safetensors(tensors, tmp / "optimizer.safetensors")
        write_safetensors(rng, tmp / "rng_state.safetensors")
        (tmp / "trainer_state.json").write_text(json.dumps({**state, "optimizer": meta}, indent=2))
        files = {**extra_files, **{f: tmp / f for f in STATE_FILES}}
        out = save_model_folder(model, run / f"{PREFIX}{step:07d}", files, tmp, base)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for _, old in checkpoints(run)[:-keep]:  # renamed first: Ctrl-C amid rmtree leaves no half checkpoint
        gone = run / f".{old.name}.pruned"
        shutil.rmtree(gone, ignore_errors=True)
        shutil.rmtree(old.rename(gone), ignore_errors=True)
    return out


def save_model_folder(model: PaliGemma, folder: Path, extra_files: dict[str, Path], tmp: Path | None = None,
                      base: str | None = None) -> Path:
    """`save_model` for a run: LoRA layers (lora.py) are saved merged, with their adapter beside (written in `tmp`,
    a scratch folder in the run, made here if not given; `base`: the run's [model] init)."""
    scratch = tmp or Path(tempfile.mkdtemp(prefix=".state.", dir=folder.parent))
    try:
        files = {**extra_files, **lora.save_adapter(model, scratch, base)}
        with lora.merged(model):
            return save_model(model, folder, extra_files=files)
    finally:
        if tmp is None:
            shutil.rmtree(scratch, ignore_errors=True)


def optimizer_state(opt: torch.optim.Optimizer, names: list[str]) -> tuple[dict[str, torch.Tensor], dict]:
    """AdamW's state keyed by parameter name: tensors for safetensors, the rest (group settings) for JSON."""
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for idx, st in sd["state"].items():
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"{names[idx]}::{k}"] = v.detach().contiguous().cpu()
            else:
                scalars[f"{names[idx]}::{k}"] = v
    groups = [{k: v for k, v in g.items() if k != "params"} | {"params": [names[i] for i in g["params"]]}
              for g in sd["param_groups"]]
    return tensors, {"param_groups": groups, "scalars": scalars}


def load_optimizer(opt: torch.optim.Optimizer, names: list[str], saved_state: Saved,
                   trainable: str = "[train] trainable") -> None:
    """Load the saved moments into `opt`, by parameter name; the saved trainable set must equal the current one
    (`trainable`: the setting that chooses it, for the error). The parameter groups' settings (weight decay, betas,
    eps, lr_scale) stay the current config's, whatever the groups were when the checkpoint was written."""
    meta, tensors, folder = saved_state.state["optimizer"], saved_state.optimizer, saved_state.folder
    saved = [n for g in meta["param_groups"] for n in g["params"]]
    if set(saved) != set(names):
        extra, missing = sorted(set(names) - set(saved)), sorted(set(saved) - set(names))
        which = f"it did not train {extra[0]}" if extra else f"it trained {missing[0]}"
        raise CheckpointError(
            f"{folder}: the checkpoint trained {len(saved)} parameters and this run trains {len(names)} ({which}): "
            f"resume with the same {trainable} setting"
        )
    index = {n: i for i, n in enumerate(names)}
    state: dict[int, dict] = {}
    for key, t in tensors.items():
        n, k = key.split("::")
        state.setdefault(index[n], {})[k] = t
    for key, v in meta["scalars"].items():
        n, k = key.split("::")
        state.setdefault(index[n], {})[k] = v
    opt.load_state_dict({"state": state, "param_groups": opt.state_dict()["param_groups"]})


@dataclass
class Saved:
    """A checkpoint's training state, every file checked (`read`)."""

    folder: Path
    state: dict  # trainer_state.json
    optimizer: dict[str, torch.Tensor]  # optimizer.safetensors
    rng: dict[str, torch.Tensor]  # rng_state.safetensors

    @property
    def step(self) -> int:
        return self.state["step"]


def read(folder: Path) -> Saved:
    """Read a checkpoint's training state and check all it holds: every JSON file parses, every safetensors file
    is complete, and trainer_state.json has what a resume uses. CheckpointError names the first damaged file."""
    # config, tokenizer, trainer_state: each must parse (advice "": nothing to download again)
    parsed = {f.name: read_json_object(f, advice="") for f in sorted(folder.glob("*.json"))}
    for f in weight_files(folder):  # the weights are read later, when the model is built: here the size is checked
        check_safetensors(f, advice="")
    file, st = folder / "trainer_state.json", parsed["trainer_state.json"]
    step, meta = st.get("step"), st.get("optimizer")
    if type(step) is not int or step < 0:
        raise _damaged(file, f"its step is {step!r}, not a whole number")
    groups = meta.get("param_groups") if isinstance(meta, dict) else None
    if not (isinstance(groups, list) and all(isinstance(g, dict) and isinstance(g.get("params"), list) for g in groups)
            and isinstance(meta.get("scalars"), dict)):
        raise _damaged(file, "its optimizer entry lacks param_groups or scalars")
    params = {n for g in groups for n in g["params"]}
    opt = _tensors(folder / "optimizer.safetensors")
    for where, keys in ((file, meta["scalars"]), (folder / "optimizer.safetensors", opt)):
        bad = next((k for k in keys if k.count("::") != 1 or k.split("::")[0] not in params), None)
        if bad is not None:
            raise _damaged(where, f"{bad!r} is no saved parameter's state")
    if ((st.get("config") or {}).get("lora") or {}).get("rank"):  # a LoRA run's adapters must be whole too
        _tensors(folder / lora.ADAPTER_FILE)
    rng = _tensors(folder / "rng_state.safetensors")
    if "torch.rank0" not in rng or any(t.dtype != torch.uint8 or t.ndim != 1 for t in rng.values()):
        raise _damaged(folder / "rng_state.safetensors", "no torch.rank0 generator state of uint8 bytes")
    return Saved(folder, st, opt, rng)


def newest_readable(found: list[tuple[int, Path]]) -> tuple[Saved, list[tuple[Path, str]]]:
    """The newest of `found` (checkpoints(run)) that `read` accepts, and the newer ones skipped with why."""
    skipped = []
    for _, folder in reversed(found):
        try:
            return read(folder), skipped
        except CheckpointError as e:
            skipped.append((folder, str(e)))
    n = len(skipped) - 1
    more = f"; {n} older {'one is' if n == 1 else 'ones are'} damaged too" if n else ""
    raise CheckpointError(f"--resume: no checkpoint is usable: {skipped[0][1]}{more}")


def _damaged(file: Path, why: str) -> CheckpointError:
    return CheckpointError(f"{file} is damaged ({why})")


def _tensors(file: Path) -> dict[str, torch.Tensor]:
    check_safetensors(file, advice="")
    try:
        return load_file(str(file))
    except (SafetensorError, OSError) as e:
        raise _damaged(file, str(e)) from None


def diverged(run: Path, step: int, loss: float, norm: float) -> NumericsError:
    """The error for a step whose loss or gradient is not finite; its update is not applied, so the weights and
    the checkpoints (never pruned for a diverged one) stay as they were."""
    found = checkpoints(run)
    kept = f"the last checkpoint, step {found[-1][0]}, is intact: --resume" if found else "no checkpoint yet: rerun"
    return NumericsError(f"training diverged at step {step + 1}: loss {loss}, gradient norm {norm} (not applied); "
                         f"lower [optim] lr, keep [optim] clip_grad_norm > 0 or train in float32; {kept} after "
                         "changing the config")
