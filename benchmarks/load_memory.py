"""Peak resident memory of loading a full-size PaliGemma checkpoint, relative to the size of its weights.

    python benchmarks/load_memory.py [--preset paligemma-3b-224] [--dtype bfloat16] [--dir /tmp/pg-3b]

Writes a random-weight checkpoint of the preset's real shapes (sharded at 2 GB, as on the Hub) unless it exists,
then measures, each in a fresh process under `/usr/bin/time -v`:
  - load:          palitorch.checkpoint.load_model(dir, dtype)
  - load+forward:  the same, then one forward pass over a 224px image and a short prompt (touches every weight)
  - baseline:      a process that only imports torch and palitorch
and prints peak RSS and RSS / weight bytes. Weights are memory-mapped: loading touches little, and a forward pass
maps each weight once, without a second copy.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path

import torch


def make(preset_name: str, dtype: torch.dtype, out: Path) -> None:
    from safetensors.torch import save_file

    from palitorch.checkpoint.io import preprocessor_config
    from palitorch.checkpoint.keys import ours_to_hf
    from palitorch.config import preset
    from palitorch.model import PaliGemma

    cfg = preset(preset_name)
    with torch.device("meta"):
        model = PaliGemma(cfg)
    out.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    shard, size, weight_map, n = {}, 0, {}, 0
    items = list(model.state_dict().items())

    def flush():
        nonlocal shard, size, n
        n += 1
        name = f"model-{n:05d}.safetensors"
        save_file(shard, str(out / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in shard})
        shard, size = {}, 0

    for k, v in items:
        t = (torch.randn(v.shape, generator=g) * 0.02).to(dtype)
        shard[ours_to_hf(k, cfg.version)] = t
        size += t.numel() * t.element_size()
        if size > 2e9:
            flush()
    if shard:
        flush()
    total = sum((out / f).stat().st_size for f in set(weight_map.values()))
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                  "weight_map": weight_map}))
    (out / "config.json").write_text(json.dumps(cfg.to_hf()))
    (out / "preprocessor_config.json").write_text(json.dumps(preprocessor_config(cfg)))


def child(mode: str, path: str, dtype: str) -> None:
    import palitorch  # noqa: F401
    from palitorch.checkpoint import load_model

    if mode == "baseline":
        return
    model = load_model(path, dtype=dtype)
    if mode == "forward":
        cfg = model.cfg
        ids = torch.tensor([[cfg.image_token_id] * cfg.num_image_tokens + [2, 100, 200, 108]])
        with torch.inference_mode():
            s = cfg.vision.image_size
            model(ids, torch.zeros(1, 3, s, s, dtype=model.projector.weight.dtype))


def measure(mode: str, path: Path, dtype: str) -> int:
    cmd = ["/usr/bin/time", "-v", sys.executable, __file__, "--child", mode, "--dir", str(path), "--dtype", dtype]
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        sys.exit(p.stderr[-2000:])
    return int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", p.stderr).group(1)) * 1024


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="paligemma-3b-224")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--dir", default="/tmp/palitorch-bench-pg1-3b")
    ap.add_argument("--child")
    a = ap.parse_args()
    if a.child:
        return child(a.child, a.dir, a.dtype)
    path = Path(a.dir)
    if not (path / "model.safetensors.index.json").exists():
        print(f"writing random {a.preset} {a.dtype} checkpoint to {path} ...", flush=True)
        make(a.preset, getattr(torch, a.dtype), path)
    weights = json.loads((path / "model.safetensors.index.json").read_text())["metadata"]["total_size"]
    base = measure("baseline", path, a.dtype)
    print(f"weights on disk: {weights / 2**30:.2f} GiB ({a.preset}, {a.dtype})")
    print(f"{'process':<14} {'peak RSS GiB':>12} {'RSS/weights':>12} {'(RSS-base)/weights':>19}")
    for mode in ("baseline", "load", "forward"):
        rss = base if mode == "baseline" else measure(mode, path, a.dtype)
        print(f"{mode:<14} {rss / 2**30:>12.2f} {rss / weights:>12.3f} {(rss - base) / weights:>19.3f}")


if __name__ == "__main__":
    main()
