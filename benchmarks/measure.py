"""Measuring helpers shared by the benchmarks: device sync, ms per decode step, memory bandwidth, a decode step's
weight products alone, and when two greedy answers count as the same (16-bit near-ties)."""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch


def sync(device):  # wait for the GPU: its work is queued, so time only after it ran
    if device.type == "cuda":
        torch.cuda.synchronize()


def ms_per_step(pipe, images, prompts, n: int, reps: int, warm: bool = True) -> float:
    """palitorch's decode time per step in ms: (median of `reps` runs of n new tokens - median of runs of 1) / (n - 1),
    EOS suppressed; with `warm`, one run of each first."""
    def run(k):
        sync(pipe.device)
        t0 = time.perf_counter()
        pipe.generate(images, prompts, max_new_tokens=k, min_new_tokens=k)
        sync(pipe.device)
        return time.perf_counter() - t0

    if warm:
        run(n), run(1)
    ones, ns = [], []
    for _ in range(reps):
        ones.append(run(1))
        ns.append(run(n))
    return (statistics.median(ns) - statistics.median(ones)) / (n - 1) * 1e3


def copy_bandwidth(device: torch.device) -> float:
    """Measured device memory bandwidth, bytes/s (bytes read + written by a 1 GiB device-to-device copy, median of
    10, on random data)."""
    x = torch.randn(2**28, device=device)
    y = torch.empty_like(x)
    for _ in range(3):
        y.copy_(x)
    times = []
    for _ in range(10):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        y.copy_(x)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return 2 * x.numel() * x.element_size() / statistics.median(times)


class ReadProbe:
    """Measures the CPU's memory read bandwidth, bytes/s, when called: the fastest of three readers over 1 GiB of
    random float32 (far past any cache), in transparent huge pages where Linux offers them (as `Pipeline.compile`
    keeps the decoder's weights), best of 9 each (a ceiling, which noise only lowers): torch's sum (one sequential
    stream per thread), and palitorch's kernel for one row by that 1 GiB as a float32 weight and by half of it in
    bfloat16 (several streams per thread, which read faster at times on the VMs of BENCHMARKS.md). A decode step's
    products read their weights once and write little, so reads are its floor (a copy, as measured on GPUs, also
    writes). On a shared VM this drifts with the neighbours' load (35 to 65 GB/s on the 2-core AMD EPYC within an
    hour, session 19): the benchmark calls it just before and just after timing each row and keeps the higher."""

    def __init__(self):
        from palitorch.model import kernels

        x = torch.randn(2**28)
        half = x[: 2**28 // 2].view(2**13, -1).bfloat16()
        kernels.use_huge_pages([x, half])
        self.readers = [(x.sum, x)]
        if kernels._skinny_works():
            skinny = torch.ops.palitorch.skinny_linear
            for w in (x.view(2**15, -1), half):
                row = torch.randn(1, w.shape[1]).to(w.dtype)
                self.readers.append((lambda w=w, row=row: skinny(row, w), w))

    def __call__(self) -> float:
        best = 0.0
        for read, tensor in self.readers:
            read()
            times = []
            for _ in range(9):
                t0 = time.perf_counter()
                read()
                times.append(time.perf_counter() - t0)
            best = max(best, tensor.numel() * tensor.element_size() / min(times))
        return best


def cache_bytes() -> int | None:
    """The CPU's largest cache in bytes (Linux sysfs), None where unknown: weights that fit there are not read from
    memory at every step, so the memory floor says nothing about them."""
    sizes = []
    for entry in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        text = entry.read_text().strip().upper()
        scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
        digits = text.rstrip("KMG")
        if digits.isdigit():
            sizes.append(int(digits) * scale)
    return max(sizes, default=None)


def products_ms(model, batch: int, reps: int = 7, linear=None) -> float:
    """ms for one decode step's weight products alone: `batch` rows times each decoder weight (fused q/k/v and
    gate/up where the model holds them fused) and the LM head, eagerly through `linear` (default `F.linear`,
    torch's default kernel, what transformers calls), median of `reps`. No attention, norms, sampling or framework
    overhead: on CPU, where a step is bound by reading the weights, a step through `F.linear` cannot be faster than
    this. (palitorch's `kernels.linear` takes its own kernel for such products where that is faster.)"""
    import torch.nn.functional as F

    linear = linear or F.linear
    lm = model.language_model
    weights = []
    for layer in lm.layers:
        a, m = layer.attn, layer.mlp
        weights += [a.qkv] if a.qkv is not None else [a.q_proj.weight, a.k_proj.weight, a.v_proj.weight]
        weights += [a.o_proj.weight]
        weights += [m.gate_up] if m.gate_up is not None else [m.gate_proj.weight, m.up_proj.weight]
        weights += [m.down_proj.weight]
    weights.append(lm.embed_tokens.weight)  # the LM head (tied to the embedding)
    w0 = weights[0]
    xs = {w.shape[1]: torch.randn(batch, w.shape[1], dtype=w0.dtype, device=w0.device) for w in weights}

    def step():
        with torch.inference_mode():
            for w in weights:
                linear(xs[w.shape[1]], w)

    step()
    times = []
    for _ in range(reps):
        sync(w0.device)
        start = time.perf_counter()
        step()
        sync(w0.device)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def default_tie_tol(dtype: torch.dtype, quantize: str | None = None) -> float:
    """Nats within which a differing token counts as a near-tie: 0 in float32 (tokens must be identical), 0.5 in
    16-bit dtypes, whose rounding moves the benchmark weights' log-probabilities by up to ~0.2 (inputs.randomize).
    int8 weights (compared with transformers on the same weights dequantized): at least 0.1, for the bfloat16
    rounding of torch's CPU int8 kernel (tests/inference/test_quantized.py: up to ~0.03 on chaotic weights)."""
    tol = 0.0 if dtype == torch.float32 else 0.5
    return max(tol, 0.1) if quantize else tol


def decoder_bytes(lm) -> int:
    """Bytes of a decoder's weights (float or int8, with their scales), each tensor's memory counted once (fused
    matrices and their views share it); the KV caches left out."""
    seen = {}
    for name, t in [*lm.named_parameters(), *lm.named_buffers()]:
        if ".kv_cache." not in f".{name}":
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(seen.values())


def same_answer(a, b, tol: float) -> bool:
    """Do two greedy answers of palitorch (two attention kernels) agree? Identical tokens, or (tol > 0, 16-bit
    dtypes) tokens that first differ where the two chose tokens of log-probabilities within `tol` of each other:
    a near-tie that rounding broke either way. (The full check against transformers comes after.)"""
    k = next((i for i, (x, y) in enumerate(zip(a.token_ids, b.token_ids)) if x != y), None)
    if k is None:
        return len(a.token_ids) == len(b.token_ids)
    return tol > 0 and abs(a.logprobs[k] - b.logprobs[k]) <= tol


def cudagraph_skips() -> int:
    """How many times inductor has declined to make a CUDA graph in this process (a skip is otherwise silent)."""
    from torch._dynamo.utils import counters

    return int(counters["inductor"].get("cudagraph_skips", 0))


def compare_tokens(ours, ours_lp, hf, hf_logits, tol: float) -> dict:
    """Do the two greedy decodes agree? Each row is compared up to its first differing token (after that the
    contexts differ). A row that differs passes only as a near-tie: at that step our token's log-probability under
    transformers' own distribution is within `tol` nats of the token transformers chose (a 16-bit dtype rounds
    logits to a few hundredths, so two implementations can break a near-tie either way; `tol` 0 demands identical
    tokens). Also reports the largest |logprob difference| over the tokens both chose."""
    hf_lp = torch.stack([x.float() for x in hf_logits], 1).log_softmax(-1).cpu()  # [B, N, V]
    diverged, worst_gap, max_lp_diff, first = 0, 0.0, 0.0, None
    for i, (a, h) in enumerate(zip(ours, hf)):
        k = next((j for j, (x, y) in enumerate(zip(a, h)) if x != y), None)
        upto = len(a) if k is None else k
        for j in range(upto):
            max_lp_diff = max(max_lp_diff, abs(ours_lp[i][j] - float(hf_lp[i, j, h[j]])))
        if k is None and len(a) == len(h):
            continue
        diverged += 1
        k = min(len(a), len(h)) if k is None else k
        first = k if first is None else min(first, k)
        gap = float(hf_lp[i, k, h[k]] - hf_lp[i, k, a[k]]) if k < min(len(a), len(h)) else float("inf")
        worst_gap = max(worst_gap, gap)
    ok = diverged == 0 or worst_gap <= tol
    distinct = len({t for row in hf for t in row})
    if diverged == 0:
        summary = f"tokens identical ({len(ours)} x {len(ours[0])}, {distinct} distinct)"
    else:
        summary = (f"{diverged}/{len(ours)} rows differ from step {first}; at the divergence our token is "
                   f"{worst_gap:.3f} nats below transformers' choice in its own distribution "
                   f"({'a near-tie' if ok else 'NOT a near-tie'}, tolerance {tol})")
    summary += f"; max |logprob diff| on shared tokens {max_lp_diff:.2e}"
    if all(len(set(row)) <= 1 for row in hf):
        summary += " (WARNING: every answer repeats one token, so this check shows little; see inputs.randomize)"
    return {"ok": ok, "rows_diverged": diverged, "first_divergence": first, "worst_tie_gap": worst_gap,
            "max_logprob_diff": max_lp_diff, "distinct_tokens": distinct, "tolerance": tol, "summary": summary}
