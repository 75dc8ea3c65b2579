"""palitorch vs transformers generation speed, on the same weights, in one process.

    python benchmarks/bench_generate.py --sizes bundled,mid --batches 1,8 --new-tokens 32 --reps 5
    python benchmarks/bench_generate.py --sizes bundled,mid --no-compile       # palitorch's eager decode step
    python benchmarks/bench_generate.py --sizes pg1-3b,pg2-3b --device cuda --dtype bfloat16 --batches 1,16 \
        --compile-mode reduce-overhead

For each size: write (or reuse) a checkpoint folder, load it into palitorch and transformers (one copy of the
weights: transformers' parameters are palitorch's tensors, see `load_transformers`), check that both give the same
greedy tokens, then time, interleaving the two implementations rep by rep:
  - prefill: image + prompt to the first token (generate with 1 new token);
  - decode: ms per token = (time for N tokens - time for 1 token) / (N - 1), EOS suppressed (min_new_tokens = N).
palitorch runs as `pipe.compile()` sets it up (its compiled decode step; the first call, which compiles, is
reported apart), or eagerly with --no-compile. A batch is B different inputs: easy-VQA-like images (a coloured
shape on white) with prompts of several lengths, so rows differ and the shorter ones are left-padded.
palitorch is timed through its whole public API (`pipe.generate`: image preprocessing and tokenisation included);
transformers through `model.generate` on inputs prepared in advance, so the comparison is conservative.
Prints medians and ratios, and writes a JSON record. Refuses to report a speedup when the tokens differ.
Each decode figure also gets its share of the memory floor: every decoder weight and the live KV cache read once
per step, at the device's measured bandwidth (GPU: a copy, measured once; CPU: reads, measured between the reps,
the highest kept; none where the weights fit in the CPU's caches). See `measure.ReadProbe`.

Sizes: `bundled` (the bundled easy-VQA model; random weights of its shape if it is absent), `mid` (~200M
parameters), `pg1-3b` / `pg2-3b` (the real 3B shapes, random weights; ~17 GB of memory in float32), or the path
of a checkpoint folder (e.g. real weights you downloaded). Random weights come from `inputs.randomize`, made so that
answers vary with the input.
"""

from __future__ import annotations

import argparse
import inspect
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
sys.path.insert(0, str(ROOT / "benchmarks"))

from inputs import SIZES, check_size, checkpoint, transformers_dequantized, workload  # noqa: E402
from measure import (  # noqa: E402
    ReadProbe,
    cache_bytes,
    compare_tokens,
    copy_bandwidth,
    cudagraph_skips,
    decoder_bytes,
    default_tie_tol,
    ms_per_step,
    products_ms,
    same_answer,
    sync,
)

import palitorch  # noqa: E402
from palitorch.model import kernels  # noqa: E402


def hf_missing_softcap(hf) -> bool:
    """True for transformers versions (5.17, for one) whose PaliGemmaForConditionalGeneration does not apply the
    text config's final_logit_softcapping (Gemma 2) to its logits; later versions do, as big_vision does."""
    return "final_logit_softcapping" not in inspect.getsource(type(hf).forward)


def load_transformers(pipe, folder: Path, dtype: torch.dtype, device: torch.device, from_files: bool | None = None):
    """transformers' PaliGemma over palitorch's weight tensors: one copy of the weights in memory (two float32 copies
    of a 3B model would not fit a 24 GB machine). Each of its parameters becomes a `Parameter` on the very tensor
    palitorch holds (after `fuse_projections`, q/k/v and gate/up are views of the fused matrices); its buffers (RoPE
    frequencies, position ids) are its own. On CPU the tensors go in through `from_pretrained(state_dict=...)`, with
    no second copy even for a moment; elsewhere transformers reads the files to the host and its parameters are then
    swapped for palitorch's (`from_files` forces either route). Returns (model, share of its parameter bytes that
    are palitorch's memory)."""
    from transformers import PaliGemmaForConditionalGeneration as HF

    from palitorch.checkpoint.keys import LM_HEAD, hf_to_ours, ours_to_hf

    version = pipe.model.cfg.version
    ours = dict(pipe.model.state_dict())
    if not (device.type != "cpu" if from_files is None else from_files):
        state = {ours_to_hf(k, version): t for k, t in ours.items()}
        hf = HF.from_pretrained(None, config=str(folder), state_dict=state, dtype=dtype)
    else:
        hf = HF.from_pretrained(folder, dtype=dtype)
    embed, wrapped = "language_model.embed_tokens.weight", {}
    for name, p in list(hf.named_parameters(remove_duplicate=False)):
        tied = name in LM_HEAD and pipe.model.cfg.text.tie_embeddings
        key = embed if tied else hf_to_ours(name, version)  # a tied LM head is the embedding
        if key in ours and ours[key].shape == p.shape and p.data_ptr() != ours[key].data_ptr():
            module_name, _, attr = name.rpartition(".")  # a name this transformers spells otherwise keeps its copy
            wrapped.setdefault(key, torch.nn.Parameter(ours[key], requires_grad=False))
            setattr(hf.get_submodule(module_name), attr, wrapped[key])
    hf = hf.to(device).eval()  # the buffers; the parameters are already there
    storage = {t.untyped_storage().data_ptr() for t in ours.values()}
    params = list(hf.parameters())
    shared = sum(p.nbytes for p in params if p.untyped_storage().data_ptr() in storage)
    return hf, shared / sum(p.nbytes for p in params)


def first_call(pipe, ours, n: int, args):
    """The first timed call (it pays any compilation). Should the compiled step fail on this machine, say why and
    fall back, so that one device call still yields figures: compile mode -> default inductor -> eager."""
    modes = [args.compile_mode, None] if args.compile and args.compile_mode else [None] if args.compile else []
    for i, mode in enumerate(modes):
        try:
            return ours(n), f"compiled ({mode or 'default'})"
        except Exception as e:  # noqa: BLE001 - report any failure of the compiler and carry on
            msg = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
            print(f"  compiled step (mode {mode}) failed: {type(e).__name__}: {msg}")
            if i + 1 < len(modes):  # (fuse=False: transformers holds views of the weights fused already)
                pipe.compile(mode=modes[i + 1], options=args.compile_options, fuse=False)
            else:
                pipe._steps = None
    return ours(n), "eager"


def choose_decode_attention(pipe, args) -> dict:
    """--decode-attention auto: compile the step with each one-token attention ("sdpa": SDPA, or matmuls for Gemma 2's
    soft-cap; "flex": FlexAttention), time each at batch 1 (ms per step, medians of 3 runs of 1 and N tokens), and
    keep the fastest of those that give the first one's tokens (up to a near-tie in 16-bit dtypes, `same_answer`).
    Returns {kind: ms per step, or the failure}."""
    images, prompts = workload(1)
    n, lm = args.new_tokens, pipe.model.language_model

    timings, reference, compiled, firsts = {}, None, {}, {}
    for kind in ("sdpa", "flex"):
        lm.set_decode_attention(kind)
        pipe.compile(mode=args.compile_mode, options=args.compile_options, fuse=reference is None)
        compiled[kind] = pipe._steps  # kept: compiling the winner again would cost a third compilation
        try:
            sync(pipe.device)
            t0 = time.perf_counter()
            answer = pipe.generate(images, prompts, max_new_tokens=n, min_new_tokens=n)[0]  # compiles
            sync(pipe.device)
            first = firsts[kind] = time.perf_counter() - t0
        except Exception as e:  # noqa: BLE001 - a kernel that does not build here loses; the others carry on
            timings[kind] = f"failed: {type(e).__name__}: {str(e).strip()[:200]}"
            print(f"  decode attention {kind}: {timings[kind]}")
            continue
        reference = reference or answer
        if not same_answer(answer, reference, args.tie_tol):
            timings[kind] = "tokens differ from the first kind's (not at a near-tie)"
            print(f"  decode attention {kind}: {timings[kind]}")
            continue
        timings[kind] = ms_per_step(pipe, images, prompts, n, reps=3, warm=False)
        print(f"  decode attention {kind}: {timings[kind]:.3f} ms per step at batch 1 (first call {first:.1f} s)")
    timed = {k: v for k, v in timings.items() if isinstance(v, float) and v > 0}  # (<= 0: noise, raise --reps)
    best = min(timed, key=timed.get) if timed else "sdpa"
    lm.set_decode_attention(best)
    if timed:  # its compiled functions, whose graphs (CUDA graphs too) are already made
        pipe._steps = compiled[best]
    else:
        pipe.compile(mode=args.compile_mode, options=args.compile_options, fuse=False)
    print(f"  decode attention: {best}")
    return {"chosen": best, "ms_per_step_batch_1": timings, "first_call_s_batch_1": firsts}


def bench(size: str, args, workdir: Path, emit=lambda result, row: None) -> dict:
    """One size: the token check and timings at each batch size. `emit(result, row)` is called as each row is done
    (the caller prints and saves it: a run cut short by a time limit keeps the rows it finished)."""
    import transformers

    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    folder, kind = checkpoint(size, workdir, args.device, dtype)
    pipe = palitorch.load(folder, device=args.device, dtype=args.dtype, quantize=args.quantize)
    pipe.feature_cache.resize(0)  # every repetition runs the vision tower, as transformers' do
    attention = {"chosen": "default" if args.decode_attention == "auto" else args.decode_attention}
    if args.compile and args.decode_attention == "auto":
        attention = choose_decode_attention(pipe, args)
    else:
        if attention["chosen"] != "default":  # else palitorch's own choice ("auto", see set_decode_attention)
            pipe.model.language_model.set_decode_attention(attention["chosen"])
        if args.compile:
            pipe.compile(mode=args.compile_mode, options=args.compile_options)
    if args.quantize:  # palitorch's weights are int8: transformers gets the same weights dequantized, its own copy
        hf, shared = transformers_dequantized(folder, dtype, device), 0.0
        print(f"  {size}: transformers runs on palitorch's int8 weights dequantized to {args.dtype} (its own copy)")
    else:
        hf, shared = load_transformers(pipe, folder, dtype, device)
        print(f"  {size}: transformers runs on palitorch's weight tensors ({100 * shared:.0f}% of its parameter "
              f"bytes{': one copy in memory' if shared == 1 else '; the rest are copies'})")
    n_params = sum(p.numel() for p in pipe.model.parameters()) + sum(  # (int8 weights are buffers; fused ones
        b.numel() for n, b in pipe.model.named_buffers() if b.dtype == torch.int8 and n.endswith(".weight"))  # aside)
    rows = []
    result = {"size": size, "weights": kind, "params": n_params, "weights_shared": shared, "quantize": args.quantize,
              "decode_attention": attention, "rows": rows}
    for b in args.batches:
        images, prompts = workload(b)
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
        skipped = cudagraph_skips()  # (a count for the whole process: the other decode attention's too)
        sync(device)
        t0 = time.perf_counter()
        res, step_kind = first_call(pipe, ours, n, args)
        sync(device)
        first_call_s = time.perf_counter() - t0
        with torch.inference_mode():
            out = hf.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False, output_logits=True,
                              return_dict_in_generate=True)
        hf_logits = out.logits
        if cap := (hf_missing_softcap(hf) and pipe.model.cfg.text.final_softcap):
            hf_logits = [torch.tanh(x.float() / cap) * cap for x in hf_logits]
            print(f"  note: transformers {transformers.__version__} leaves out PaliGemma 2's final logit soft-cap; "
                  f"the check applies it ({cap}) to transformers' logits")
        check = compare_tokens([r.token_ids for r in res], [r.logprobs for r in res], out.sequences[:, t:].tolist(),
                               hf_logits, args.tie_tol)
        row = {"batch": b, "prompt_tokens": t, "new_tokens": n, "same_tokens": check["ok"], "check": check,
               "ours_first_call_s": first_call_s, "ours_step": step_kind}
        if b == 1 and (choice := attention.get("first_call_s_batch_1", {}).get(attention["chosen"])):
            row["ours_first_call_s_in_choice"] = choice  # (batch 1 was compiled while choosing the attention)
        if str(device).startswith("cuda") and (skips := cudagraph_skips() - skipped):  # (else only TORCH_LOGS tells)
            row["cudagraph_skips"] = skips
            print(f"  warning: CUDA graphs were skipped {skips} time(s): the compiled step runs without them")
        print(f"  {size} batch {b}: {check['summary']}")
        if not check["ok"]:
            print("  TOKENS DIFFER: no speed reported")
            rows.append(row)
            emit(result, row)
            continue
        for fn in (ours, theirs):  # warm-up (allocations, caches, lazy init)
            fn(1), fn(n)
        times = {"ours_1": [], "ours_n": [], "hf_1": [], "hf_n": []}
        bandwidths = [args.bandwidth]  # on CPU measured again between the reps, where it drifts (see ReadProbe)
        for _ in range(args.reps):
            bandwidths += [args.probe()] if args.probe else []
            for name, fn in (("ours", ours), ("hf", theirs)):
                for k in (1, n):
                    sync(device)
                    t0 = time.perf_counter()
                    fn(k)
                    sync(device)
                    times[f"{name}_{'1' if k == 1 else 'n'}"].append(time.perf_counter() - t0)
        bandwidths += [args.probe()] if args.probe else []
        med = {k: statistics.median(v) for k, v in times.items()}
        for name in ("ours", "hf"):
            row[f"{name}_prefill_ms"] = med[f"{name}_1"] * 1e3
            row[f"{name}_decode_ms_per_step"] = (med[f"{name}_n"] - med[f"{name}_1"]) / (n - 1) * 1e3
        row["prefill_speedup"] = row["hf_prefill_ms"] / row["ours_prefill_ms"]
        if min(row["ours_decode_ms_per_step"], row["hf_decode_ms_per_step"]) <= 0:  # noise swamped N - 1 steps
            row["decode_not_measured"] = "runs of N tokens were not slower than runs of 1: raise --new-tokens or --reps"
            rows.append(row)
            emit(result, row)
            continue
        for name in ("ours", "hf"):
            row[f"{name}_decode_tok_s"] = b / (row[f"{name}_decode_ms_per_step"] / 1e3)
        if device.type == "cpu" and not args.quantize:  # float products through F.linear: transformers' floor
            row["products_ms_per_step"] = products_ms(pipe.model, b)
            row["hf_over_products"] = row["hf_decode_ms_per_step"] / row["products_ms_per_step"]
            row["ours_products_ms_per_step"] = products_ms(pipe.model, b, linear=kernels.linear)  # palitorch's route
        if args.bandwidth:  # the floor: every decoder weight and the live KV cache read once per step, at the
            bandwidth = max(bandwidths)  # highest bandwidth measured around this row's timing
            cfg = pipe.model.cfg.text
            kv = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * (t + n / 2) * b * torch.finfo(dtype).bits // 8
            step_bytes = decoder_bytes(pipe.model.language_model) + kv
            row["bytes_per_step"] = step_bytes
            if device.type == "cpu" and step_bytes < 2 * (args.cache_bytes or 0):
                row["limit_note"] = "the weights fit in the CPU's caches: no memory floor"
            else:
                row["bandwidth_bytes_s"] = bandwidth
                row["limit_tok_s"] = b * bandwidth / step_bytes
                row["ours_pct_of_limit"] = 100 * row["ours_decode_tok_s"] / row["limit_tok_s"]
                row["hf_pct_of_limit"] = 100 * row["hf_decode_tok_s"] / row["limit_tok_s"]
        row["decode_speedup"] = row["hf_decode_ms_per_step"] / row["ours_decode_ms_per_step"]
        rows.append(row)
        emit(result, row)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="bundled,mid",
                    help=f"comma-separated: {', '.join(SIZES)}, or checkpoint folders (default: bundled,mid)")
    ap.add_argument("--batches", default="1,8", help="comma-separated batch sizes (default: 1,8)")
    ap.add_argument("--new-tokens", type=int, default=32, help="N, the tokens of a decode run (default 32)")
    ap.add_argument("--reps", type=int, default=5, help="interleaved repetitions; medians are reported (default 5)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                    help="palitorch with pipe.compile() (the default; its first call is reported apart) or eager")
    ap.add_argument("--compile-mode", default=None, help='torch.compile mode, e.g. "reduce-overhead" on GPU')
    ap.add_argument("--compile-options", type=json.loads, default=None,
                    help='extra inductor options as JSON, e.g. \'{"coordinate_descent_tuning": true}\'')
    ap.add_argument("--decode-attention", default="default", choices=("default", "sdpa", "matmul", "flex", "auto"),
                    help="palitorch's one-token attention (set_decode_attention; flex runs in compiled steps); "
                         "default: palitorch's own choice (SDPA, or matmuls on CPUs without AMX); "
                         "auto: time sdpa and flex at batch 1 and keep the faster")
    ap.add_argument("--quantize", choices=("int8",), default=None,
                    help="palitorch with int8 weights (palitorch.load(quantize=...)); transformers then runs the same "
                         "weights dequantized")
    ap.add_argument("--tie-tol", type=float, default=None,
                    help="nats within which a differing token counts as a near-tie (default: default_tie_tol, 0 in "
                         "float32 where tokens must be identical, 0.5 in 16-bit dtypes)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--no-onednn", action="store_true",
                    help="palitorch without its oneDNN route for large CPU linears (palitorch.model.kernels)")
    ap.add_argument("--no-skinny", action="store_true",
                    help="palitorch without its own kernel for a few rows by a large CPU weight (palitorch.native)")
    ap.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "palitorch-bench"))
    ap.add_argument("--json", default="benchmarks/results/generate.json")
    args = ap.parse_args()
    args.sizes = [s for s in args.sizes.split(",") if s]
    if errors := [e for e in map(check_size, args.sizes) if e]:
        ap.error(errors[0])
    try:
        args.batches = [int(b) for b in args.batches.split(",")]
    except ValueError:
        ap.error(f"--batches takes comma-separated whole numbers, e.g. 1,8; got {args.batches!r}")
    if args.new_tokens < 2 or args.reps < 1 or min(args.batches) < 1:
        ap.error("--new-tokens must be at least 2 (decode time is the difference of 1 and N tokens); --reps and "
                 "--batches at least 1")
    if args.tie_tol is None:
        args.tie_tol = default_tie_tol(getattr(torch, args.dtype), args.quantize)
    if args.threads:
        torch.set_num_threads(args.threads)
    kernels.use_onednn(not args.no_onednn)
    kernels.use_skinny(not args.no_skinny)
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    import transformers

    # The decode floor: GPUs' copy bandwidth (bytes read + written), CPUs' read bandwidth (see measure.py).
    on_gpu = args.device.startswith("cuda")
    args.probe = ReadProbe() if args.device == "cpu" else None  # measured again around each row's timing
    args.bandwidth = copy_bandwidth(torch.device(args.device)) if on_gpu else (args.probe() if args.probe else None)
    args.cache_bytes = None if on_gpu else cache_bytes()

    machine = (torch.cuda.get_device_name() if args.device.startswith("cuda") else
               f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads")
    kind = "copy" if on_gpu else "read"
    record = {"machine": machine, f"{kind}_bandwidth_bytes_s": args.bandwidth, "torch": torch.__version__,
              "transformers": transformers.__version__, "device": args.device, "dtype": args.dtype,
              "command": " ".join(sys.argv), "results": []}
    print(f"{machine} | torch {torch.__version__} | transformers {transformers.__version__} | {args.dtype}"
          f"{' | palitorch compiled' if args.compile else ''}{f' | palitorch {args.quantize}' if args.quantize else ''}"
          f"{' | no oneDNN route' if args.no_onednn else ''}"
          f"{' | no skinny kernel' if args.no_skinny else ''}"
          f"{f' | decode attention {args.decode_attention}' if args.decode_attention != 'default' else ''}"
          f"{f' | inductor options {args.compile_options}' if args.compile_options else ''}"
          f"{f' | {kind} bandwidth {args.bandwidth / 1e9:,.0f} GB/s' if args.bandwidth else ''}")
    print(f"{'size':<9}{'params':>8}{'batch':>6}{'prefill ms ours/hf':>22}{'x':>6}{'decode tok/s ours/hf':>24}{'x':>6}")
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)

    def emit(res: dict, r: dict) -> None:  # print a row and save the record as it stands
        if res not in record["results"]:
            record["results"].append(res)
        out.write_text(json.dumps(record, indent=2))
        size = Path(res["size"]).name  # a checkpoint folder by its name
        if not r["same_tokens"]:
            print(f"{size:<9}{res['params'] / 1e6:>7.1f}M{r['batch']:>6}  tokens differ: no figures", flush=True)
            return
        limit = (f", {r['ours_pct_of_limit']:.0f}% of the bandwidth limit {r['limit_tok_s']:.0f} tok/s (transformers"
                 f" {r['hf_pct_of_limit']:.0f}%)" if "limit_tok_s" in r else "")
        if "products_ms_per_step" in r:
            limit += (f", products alone {r['products_ms_per_step']:.2f} ms/step through F.linear (transformers'"
                      f" step / that: {r['hf_over_products']:.2f}), {r['ours_products_ms_per_step']:.2f} through"
                      " palitorch's route")
        decode = (f"{r['ours_decode_tok_s']:>12.1f} /{r['hf_decode_tok_s']:>9.1f} {r['decode_speedup']:>5.2f}"
                  if "decode_speedup" in r else f"  decode not measured ({r['decode_not_measured']})")
        print(f"{size:<9}{res['params'] / 1e6:>7.1f}M{r['batch']:>6}"
              f"{r['ours_prefill_ms']:>11.1f} /{r['hf_prefill_ms']:>8.1f} {r['prefill_speedup']:>5.2f}{decode}"
              f"   first call {r.get('ours_first_call_s_in_choice', r['ours_first_call_s']):.1f} s{limit}", flush=True)

    for size in args.sizes:
        bench(size, args, workdir, emit)
    out.write_text(json.dumps(record, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
