"""Checkpoints: a Hub-layout model folder plus the training state, written atomically, the newest K kept.

    RUN/checkpoint-0000500/
        config.json  model.safetensors  preprocessor_config.json  tokenizer.json ...   (palitorch.load, transformers)
        trainer_state.json       step, epoch, seed, batch size, data fingerprint, schedule, resolved config
        optimizer.safetensors    AdamW moments per parameter name ("<name>::exp_avg", "<name>::exp_avg_sq", ...)
        rng_state.safetensors    torch (and CUDA) generator states of every process, as uint8 tensors

Nothing is pickled: tensors go to safetensors and scalars to JSON. The whole folder is built under a temporary name
and renamed into place (palitorch.checkpoint.save_model), so a crash never leaves a half-written checkpoint.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from palitorch.checkpoint import save_model
from palitorch.errors import CheckpointError
from palitorch.model import PaliGemma
from palitorch.train import ddp

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


def restore_rng(folder: Path, d: ddp.Dist, device: torch.device) -> None:
    t = load_file(str(folder / "rng_state.safetensors"))
    if f"torch.rank{d.rank}" in t:  # a run resumed on more processes than it had: new ranks keep their seed
        torch.set_rng_state(t[f"torch.rank{d.rank}"])
    if device.type == "cuda" and f"cuda.rank{d.rank}" in t:
        torch.cuda.set_rng_state(t[f"cuda.rank{d.rank}"], device)


def save(run: Path, step: int, model: PaliGemma, opt: torch.optim.Optimizer, names: list[str],
         state: dict, rng: dict[str, torch.Tensor], extra_files: dict[str, Path], keep: int) -> Path:
    """Write RUN/checkpoint-<step> (first process only) and delete all but the newest `keep` checkpoints."""
    tmp = Path(tempfile.mkdtemp(prefix=".state.", dir=run))
    try:
        tensors, meta = optimizer_state(opt, names)
        save_file(tensors, str(tmp / "optimizer.safetensors"))
        save_file(rng, str(tmp / "rng_state.safetensors"))
        (tmp / "trainer_state.json").write_text(json.dumps({**state, "optimizer": meta}, indent=2))
        files = {**extra_files, **{f: tmp / f for f in STATE_FILES}}
        out = save_model(model, run / f"{PREFIX}{step:07d}", extra_files=files)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for _, old in checkpoints(run)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return out


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


def load_optimizer(opt: torch.optim.Optimizer, names: list[str], folder: Path) -> None:
    """Load the saved moments into `opt`; the saved trainable set must equal the current one."""
    meta = json.loads((folder / "trainer_state.json").read_text())["optimizer"]
    tensors = load_file(str(folder / "optimizer.safetensors"))
    saved = [n for g in meta["param_groups"] for n in g["params"]]
    if saved != names:
        raise CheckpointError(
            f"{folder}: the checkpoint trained {len(saved)} parameters and this run trains {len(names)}: resume "
            "with the same [train] trainable setting"
        )
    index = {n: i for i, n in enumerate(names)}
    state: dict[int, dict] = {}
    for key, t in tensors.items():
        n, k = key.split("::")
        state.setdefault(index[n], {})[k] = t
    for key, v in meta["scalars"].items():
        n, k = key.split("::")
        state.setdefault(index[n], {})[k] = v
    sd = opt.state_dict()
    for g, saved_g in zip(sd["param_groups"], meta["param_groups"]):
        g.update({k: (tuple(v) if isinstance(v, list) else v) for k, v in saved_g.items() if k != "params"})
    opt.load_state_dict({"state": state, "param_groups": sd["param_groups"]})


def read_state(folder: Path) -> dict:
    return json.loads((folder / "trainer_state.json").read_text())
