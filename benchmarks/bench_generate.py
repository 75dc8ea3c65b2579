"""palitorch vs transformers generation speed, on the same weights, in one process.

    python benchmarks/bench_generate.py --sizes bundled,mid --batches 1,8 --new-tokens 32 --reps 5
    python benchmarks/bench_generate.py --sizes bundled,mid --compile          # palitorch's compiled decode step
    python benchmarks/bench_generate.py --sizes pg1-3b,pg2-3b --device cuda --dtype bfloat16 --batches 1,16 \
        --compile --compile-mode reduce-overhead

For each size: write (or reuse) a checkpoint folder, load it into palitorch and transformers, check that both give
the same greedy tokens, then time, interleaving the two implementations rep by rep:
  - prefill: image + prompt to the first token (generate with 1 new token);
  - decode: ms per token = (time for N tokens - time for 1 token) / (N - 1), EOS suppressed (min_new_tokens = N).
palitorch is timed through its whole public API (`pipe.generate`: image preprocessing and tokenisation included);
transformers through `model.generate` on inputs prepared in advance, so the comparison is conservative.
Prints medians and ratios, and writes a JSON record. Refuses to report a speedup when the tokens differ.

Sizes: `bundled` (the bundled easy-VQA model; random weights of its shape if it is absent), `mid` (~200M
parameters), `pg1-3b` / `pg2-3b` (the real 3B shapes, random weights; for machines with the memory).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import palitorch  # noqa: E402
from palitorch.checkpoint import save_model  # noqa: E402
from palitorch.config import PaliGemmaConfig, TextConfig, VisionConfig, preset  # noqa: E402
from palitorch.model import PaliGemma  # noqa: E402
from palitorch.train.tokenizer import save_tokenizer, train_tokenizer  # noqa: E402

PROMPT = "answer en what color is the shape in the image?"


def _tokenizer():
    words = ["caption en", "answer en what color is the shape in the image?", "detect circle", "a red circle"]
    return train_tokenizer(words * 20, vocab_size=300)


def _config(size: str, tok) -> PaliGemmaConfig:
    image_id = tok.token_to_id("<image>")
    if size == "mid":
        cfg = PaliGemmaConfig(
            vision=VisionConfig(hidden_size=512, intermediate_size=2048, num_layers=6, num_heads=8, image_size=224,
                                patch_size=14),
            text=TextConfig(vocab_size=tok.get_vocab_size(), hidden_size=1024, intermediate_size=4096, num_layers=12,
                            num_heads=8, num_kv_heads=1, head_dim=128),
        )
    elif size == "bundled":
        from palitorch.config import _tiny

        cfg = _tiny(tok.get_vocab_size())
    else:
        cfg = preset({"pg1-3b": "paligemma-3b-224", "pg2-3b": "paligemma2-3b-224"}[size])
    return cfg.replace(image_token_id=image_id)


def checkpoint(size: str, workdir: Path) -> tuple[Path, str]:
    """A folder for `size`: the bundled model if asked for and present, else random weights of that shape."""
    if size == "bundled":
        try:
            return palitorch.default_model_path(), "bundled model"
        except palitorch.PalitorchError:
            pass
    folder = workdir / size
    if not (folder / "config.json").exists():
        tok = _tokenizer()
        cfg = _config(size, tok)
        torch.manual_seed(0)
        model = PaliGemma(cfg)
        with torch.no_grad():  # random, non-trivial norms (the default init leaves Gemma's at zero)
            for name, p in model.named_parameters():
                if p.ndim == 1 and "norm" in name:
                    p.normal_(0, 0.1)
        tok_dir = workdir / f"{size}-tok"
        save_tokenizer(tok, tok_dir)
        save_model(model, folder, extra_files={f: tok_dir / f for f in
                                               ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")},
                   max_shard_bytes=2_000_000_000)
    return folder, "random weights"


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def bench(size: str, args, workdir: Path) -> dict:
    from transformers import PaliGemmaForConditionalGeneration

    folder, kind = checkpoint(size, workdir)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    pipe = palitorch.load(folder, device=args.device, dtype=args.dtype)
    if args.compile:
        pipe.compile(mode=args.compile_mode)
    hf = PaliGemmaForConditionalGeneration.from_pretrained(folder, dtype=dtype).to(device).eval()
    n_params = sum(p.numel() for p in pipe.model.parameters())
    from PIL import Image

    image = Image.new("RGB", (64, 64), (200, 30, 30))
    rows = []
    for b in args.batches:
        images, prompts = [image] * b, [PROMPT] * b
        enc = [pipe.processor.encode(p) for p in prompts]
        batch = pipe.processor.collate(enc, [pipe.processor.pixels(im) for im in images], padding_side="left")
        inputs = {k: batch[k].to(device) for k in ("input_ids", "attention_mask", "token_type_ids")}
        inputs["pixel_values"] = batch["pixel_values"].to(device, dtype)
        t = inputs["input_ids"].shape[1]
        n = args.new_tokens

        def ours(k, images=images, prompts=prompts):
            return pipe.generate(images, prompts, max_new_tokens=k, min_new_tokens=k)

        def theirs(k, inputs=inputs):
            with torch.inference_mode():
                return hf.generate(**inputs, max_new_tokens=k, min_new_tokens=k, do_sample=False)

        # Same greedy tokens, or no speed figures. With --compile this first call also pays the compilation.
        _sync(device)
        t0 = time.perf_counter()
        a = [r.token_ids for r in ours(n)]
        _sync(device)
        first_call_s = time.perf_counter() - t0
        h = theirs(n)[:, t:].tolist()
        same = a == h
        row = {"batch": b, "prompt_tokens": t, "new_tokens": n, "same_tokens": same, "ours_first_call_s": first_call_s}
        if not same:
            print(f"  {size} batch {b}: TOKENS DIFFER, no speed reported\n    ours {a[0][:12]}\n    hf   {h[0][:12]}")
            rows.append(row)
            continue
        for fn in (ours, theirs):  # warm-up (allocations, caches, lazy init)
            fn(1), fn(n)
        times = {"ours_1": [], "ours_n": [], "hf_1": [], "hf_n": []}
        for _ in range(args.reps):
            for name, fn in (("ours", ours), ("hf", theirs)):
                for k in (1, n):
                    _sync(device)
                    t0 = time.perf_counter()
                    fn(k)
                    _sync(device)
                    times[f"{name}_{'1' if k == 1 else 'n'}"].append(time.perf_counter() - t0)
        med = {k: statistics.median(v) for k, v in times.items()}
        for name in ("ours", "hf"):
            row[f"{name}_prefill_ms"] = med[f"{name}_1"] * 1e3
            row[f"{name}_decode_ms_per_step"] = (med[f"{name}_n"] - med[f"{name}_1"]) / (n - 1) * 1e3
            row[f"{name}_decode_tok_s"] = b / (row[f"{name}_decode_ms_per_step"] / 1e3)
        row["decode_speedup"] = row["hf_decode_ms_per_step"] / row["ours_decode_ms_per_step"]
        row["prefill_speedup"] = row["hf_prefill_ms"] / row["ours_prefill_ms"]
        rows.append(row)
    return {"size": size, "weights": kind, "params": n_params, "rows": rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="bundled,mid")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--compile", action="store_true", help="palitorch's pipe.compile() (first call reported apart)")
    ap.add_argument("--compile-mode", default=None, help='torch.compile mode, e.g. "reduce-overhead" on GPU')
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "palitorch-bench"))
    ap.add_argument("--json", default="benchmarks/results/generate.json")
    args = ap.parse_args()
    args.batches = [int(b) for b in args.batches.split(",")]
    if args.threads:
        torch.set_num_threads(args.threads)
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    import transformers

    machine = (torch.cuda.get_device_name() if args.device.startswith("cuda") else
               f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads")
    record = {"machine": machine, "torch": torch.__version__, "transformers": transformers.__version__,
              "device": args.device, "dtype": args.dtype, "command": " ".join(sys.argv), "results": []}
    print(f"{machine} | torch {torch.__version__} | transformers {transformers.__version__} | {args.dtype}"
          f"{' | palitorch compiled' if args.compile else ''}")
    print(f"{'size':<9}{'params':>8}{'batch':>6}{'prefill ms ours/hf':>22}{'x':>6}{'decode tok/s ours/hf':>24}{'x':>6}")
    for size in args.sizes.split(","):
        res = bench(size, args, workdir)
        record["results"].append(res)
        for r in res["rows"]:
            if not r["same_tokens"]:
                print(f"{size:<9}{res['params'] / 1e6:>7.1f}M{r['batch']:>6}  tokens differ: no figures")
                continue
            print(f"{size:<9}{res['params'] / 1e6:>7.1f}M{r['batch']:>6}"
                  f"{r['ours_prefill_ms']:>11.1f} /{r['hf_prefill_ms']:>8.1f}{r['prefill_speedup']:>6.2f}"
                  f"{r['ours_decode_tok_s']:>12.1f} /{r['hf_decode_tok_s']:>9.1f}{r['decode_speedup']:>6.2f}"
                  f"   first call {r['ours_first_call_s']:.1f} s")
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
