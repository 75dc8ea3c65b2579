"""Which kernel runs a linear layer: torch's default, palitorch's own for a few rows by a large float32 or bfloat16
weight, or oneDNN's for more rows (float32), on CPU at inference.

A decode step's products (a few rows by a large weight: one row per sequence) are bound by reading the weight
from memory. palitorch's `skinny_linear` (palitorch/native: compiled for this machine on first use) reads it at
26-28 GB/s at one row on the 2-core Intel VM of BENCHMARKS.md, where MKL reads 24-26 GB/s, and 1.2-1.35x faster
than oneDNN at 4-12 rows; bfloat16 weights 1.3-1.5x faster than torch's bfloat16 kernel at 1-16 rows (through
AMX tiles on CPUs that have them, AVX512-BF16's pair products on CPUs with those and no AMX, else widened to
float32 as they are read: ~1.5x at one row). `linear` sends it products of at most `skinny_max_rows(dtype)` rows
by weights of `SKINNY_TIMED_ELEMENTS` or more: the row counts, of 1, 4, 8, 12 and 16, up to which it beat the
route they would otherwise take here (timed once per process and dtype, see `_calibrate_skinny`), after a
self-check against `F.linear`. Smaller weights, from `SKINNY_MIN_ELEMENTS` (a small model's; they stay in the
caches between steps, so a call's fixed cost decides rather than the memory stream that timing measures), go to it
at up to `SKINNY_SMALL_MAX_ROWS` rows without the timing: there BLAS's call costs more than the product (one row by
a 1481 x 128 weight (the bundled LM head then), float32: MKL 18.7 us, palitorch's kernel 9.4; bfloat16 28.8 vs 9.6;
BENCHMARKS.md, session 18).

On CPU, `F.linear` calls MKL's sgemm. On some x86 CPUs (measured: the AMD EPYC of BENCHMARKS.md) that runs the
products of inference, a few rows times a large weight (M = 1 per sequence when decoding), at half the memory
bandwidth or less: a 1024 x 8192 weight took 3.9 ms at M = 1 and 13-33 ms at M = 8. oneDNN's inner-product
kernel, the one inductor uses when it freezes weights, reads the same plain weight in 1.9 ms and 4.6-5.7 ms, and
runs a prefill's products (M = 256-4,096) 1.0-1.8x faster. On others (measured: an Intel Xeon) MKL's M = 1 path
reads at full bandwidth and is 7-20% faster than oneDNN's, which wins there from M = 8 (1.4-1.5x) up to ~256
rows; from 512 rows MKL is 2-8% faster again. oneDNN's fixed cost per call (~30 us) loses on small weights, so
`linear` sends there only weights of `ONEDNN_MIN_ELEMENTS` or more; only products of at least as many rows as
oneDNN needs to win on this machine (timed once per process, see `_calibrate`) and, where that is more than one
row (MKL is healthy here), of fewer than `ONEDNN_MAX_ROWS`; only without autograd (the op has no backward); and
only after a one-time self-check against `F.linear` has passed. Results differ from `F.linear`'s by float32
rounding (another summation order), as any two matmul kernels do.

Under CPU autocast (a bfloat16 evaluation of float32 weights, for example) both routes step aside: `F.linear` then
computes in the autocast dtype, as asked (and on CPUs with AMX, much faster than any float32 kernel).

`use_onednn(False)` and `use_skinny(False)` turn the routes off (for example to compare against torch's default
kernels); `PALITORCH_NATIVE=0` keeps palitorch from building its kernel at all.

The checks and timings run in `prepare` (a Pipeline calls it when it is made), never inside a forward. Their
verdicts are process-wide: until a Pipeline has been made in this process every product is `F.linear`; after that
any model's products without autograd may take the routes above (a training run's no-grad evaluation loss, once
its first evaluation has made a Pipeline, for example).

`blas_one_row_is_slow` answers a related question for compiled decode steps: whether a BLAS call's fixed cost makes
a one-row product by a small weight slower than reading the weight once (then `Pipeline.compile` lets inductor turn
such products into its own kernels).
"""

import ctypes
import mmap
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

ONEDNN_MIN_ELEMENTS = 1 << 20  # ~4 MB of float32: below this, torch's default kernel is as fast or faster
ONEDNN_MIN_ROWS: int | None = None  # products with fewer rows keep F.linear; None: measured on this machine
ONEDNN_MAX_ROWS = 512  # products with as many rows or more keep F.linear, where oneDNN does not win at one row
SKINNY_MIN_ELEMENTS = 1 << 16  # smaller weights keep torch's kernels (at 128 x 128, MKL's one row was as fast)
SKINNY_TIMED_ELEMENTS = 1 << 18  # 1 MB of float32: from here, up to the timed row bound (`skinny_max_rows`)
SKINNY_SMALL_MAX_ROWS = 8  # below it, up to this many rows (faster at 1, 4 and 8 rows on every weight measured)
SKINNY_MAX_ROWS: int | None = None  # products with more rows take another route; None: measured on this machine
SKINNY_DTYPES = (torch.float32, torch.bfloat16)  # weight (and input) dtypes that palitorch's kernel takes
BLAS_ONE_ROW_SLOW: bool | None = None  # see blas_one_row_is_slow; None: measured on this machine
_onednn: dict = {"enabled": True, "works": None, "min_rows": None}  # the self-check's verdict, the measurement
_blas: dict = {"slow": None}
_skinny: dict = {"enabled": True, "works": None, "max_rows": {}, "lanes": 0}  # as _onednn's; max_rows by dtype


def use_onednn(enabled: bool = True) -> None:
    """Route large float32 CPU linears through oneDNN at inference (the default), or not."""
    _onednn["enabled"] = enabled


def use_skinny(enabled: bool = True) -> None:
    """Route products of a few rows by large float32 or bfloat16 CPU weights through palitorch's kernel (the
    default), or not."""
    _skinny["enabled"] = enabled


def _pointwise(x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
    return torch.ops.mkldnn._linear_pointwise(x.contiguous(), w, b, "none", [], "")


@torch.library.custom_op("palitorch::onednn_linear", mutates_args=())
def onednn_linear(x: Tensor, w: Tensor, b: Tensor | None = None) -> Tensor:
    """oneDNN's linear as an opaque op, so that a compiled graph calls it as is (inductor's own lowering of the
    mkldnn op expects frozen weights)."""
    return _pointwise(x, w, b)


@onednn_linear.register_fake
def _(x: Tensor, w: Tensor, b: Tensor | None = None) -> Tensor:
    return x.new_empty(*x.shape[:-1], w.shape[0])


def _onednn_works() -> bool:
    """Once per process: is oneDNN's linear here, and does it agree with F.linear (2D and 3D, bias, a row view)?
    Only on x86-64, where it was measured; other CPUs keep F.linear."""
    if _onednn["works"] is None:
        ok = False
        try:
            if (platform.machine().lower() in ("x86_64", "amd64") and torch.backends.mkldnn.is_available()
                    and hasattr(torch.ops.mkldnn, "_linear_pointwise")):
                g = torch.Generator().manual_seed(0)
                w, b = torch.randn(96, 64, generator=g), torch.randn(48, generator=g)
                x = torch.randn(3, 5, 64, generator=g)
                ok = all(torch.allclose(_pointwise(a, wt, bt), F.linear(a, wt, bt), rtol=1e-4, atol=1e-4)
                         for a, wt, bt in ((x, w, None), (x[:, -1:], w[:48], b), (x[0], w, None)))
        except (RuntimeError, AttributeError):
            ok = False
        _onednn["works"] = ok
    return bool(_onednn["works"])


def _calibrate(rows=(1, 8, 64), reps: int = 9) -> int:
    """The fewest rows (of `rows`) at which oneDNN's linear beats F.linear here, timed once per process on an
    8192 x 1024 weight (32 MB: one MLP projection of a mid-size model), the two kernels interleaved, medians; a huge
    number if it never does. ~0.1 s."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(8192, 1024, generator=g)
    for m in rows:
        x = torch.randn(m, 1024, generator=g)
        times: dict = {_pointwise: [], F.linear: []}
        for _ in range(reps):
            for fn, ts in times.items():
                start = time.perf_counter()
                fn(x, w, None)
                ts.append(time.perf_counter() - start)
        if statistics.median(times[_pointwise]) < statistics.median(times[F.linear]):
            return m
    return 1 << 62


_read_weight = torch.Tensor.sum  # what `_blas_overhead` compares a one-row product with: one pass over the weight


def _blas_overhead(reps: int = 101) -> float:
    """F.linear's time for one row by a 512 x 128 weight (256 KB, in cache) over the time to sum that weight: the
    two interleaved, medians. A BLAS call that costs what reading the weight costs gives ~1."""
    g = torch.Generator().manual_seed(0)
    w, x = torch.randn(512, 128, generator=g), torch.randn(1, 128, generator=g)
    times: dict = {"linear": [], "sum": []}
    for _ in range(reps):
        start = time.perf_counter()
        F.linear(x, w)
        mid = time.perf_counter()
        _read_weight(w)
        times["linear"].append(mid - start)
        times["sum"].append(time.perf_counter() - mid)
    return statistics.median(times["linear"]) / statistics.median(times["sum"])


def blas_one_row_is_slow() -> bool:
    """Whether torch's BLAS takes more than twice as long for a one-row product by a small weight as for reading
    that weight (timed once per process, ~2 ms; `BLAS_ONE_ROW_SLOW` overrides). Measured: on the AMD EPYC VM of
    BENCHMARKS.md MKL's call cost 20-40 us at such sizes, and inductor's own multiply-and-sum kernels made the
    bundled model's compiled step 1.5x faster; on an Intel Xeon the call costs what the sum costs (~5 us), and
    the same kernels, single-threaded, made the bundled step 1.1x and the mid-size one 1.2x slower."""
    if BLAS_ONE_ROW_SLOW is not None:
        return BLAS_ONE_ROW_SLOW
    if _blas["slow"] is None:
        _blas["slow"] = _blas_overhead() > 2.0
    return _blas["slow"]


def _min_rows() -> int:
    if ONEDNN_MIN_ROWS is not None:
        return ONEDNN_MIN_ROWS
    if _onednn["min_rows"] is None:
        _onednn["min_rows"] = _calibrate()
    return _onednn["min_rows"]


def _wants_onednn(x: Tensor, w: Tensor) -> bool:
    if not (_onednn["enabled"] and x.device.type == "cpu" and x.dtype == w.dtype == torch.float32
            and w.numel() >= ONEDNN_MIN_ELEMENTS and w.is_contiguous()):
        return False
    min_rows = ONEDNN_MIN_ROWS if ONEDNN_MIN_ROWS is not None else _onednn["min_rows"]
    return bool(_onednn["works"]) and min_rows is not None and _in_range(x.numel() // x.shape[-1], min_rows)


def _in_range(rows: int, min_rows: int) -> bool:
    """oneDNN's row range: from `min_rows`; and below ONEDNN_MAX_ROWS unless it wins from one row (there MKL's
    products were slower at every size measured: the AMD VM's prefills ran 1.0-1.8x faster through oneDNN)."""
    return rows >= min_rows and (min_rows <= 1 or rows < ONEDNN_MAX_ROWS)


def _skinny_op(x: Tensor, w: Tensor, b: Tensor | None = None) -> Tensor:
    y = torch.ops.palitorch.skinny_linear(x, w)
    return y if b is None else y + b


def _skinny_works() -> bool:
    """Once per process: is palitorch's kernel built and loaded here (palitorch.native), and does it agree with
    F.linear (1 to 13 rows, row counts that do not split evenly over threads and streams, a length that is no
    multiple of the vector width, a row view of a fused matrix, a non-contiguous input), in float32 and in bfloat16
    (there within twice bfloat16's rounding of the float32 product, which is at most 2^-8 of it)?"""
    if _skinny["works"] is None:
        from palitorch import native

        ok = False
        if native.load():
            g = torch.Generator().manual_seed(0)
            w = torch.randn(3 * 83, 72, generator=g)[83:166]
            x = torch.randn(2, 13, 72, generator=g)
            cases = [x[0, :m] for m in range(1, 14)] + [x[:, -1:]]
            with torch.no_grad():
                ok = all(torch.allclose(_skinny_op(a, w), F.linear(a, w), rtol=1e-4, atol=1e-4) for a in cases)
                w16 = w.bfloat16()  # and a 32 x 64 weight, a shape that takes the AMX path where there is one
                w32 = torch.randn(32, 64, generator=g).bfloat16()
                ok = ok and all(torch.allclose(_skinny_op(a, v).float(), F.linear(a.float(), v.float()),
                                               rtol=2 ** -7, atol=1e-3)
                                for v in (w16, w32) for a in [c[..., :v.shape[1]].bfloat16() for c in cases])
        _skinny["works"] = ok
        _skinny["lanes"] = torch.ops.palitorch.skinny_lanes() if ok else 0  # 1: the plain C++ build
    return bool(_skinny["works"])


def _other_route(x: Tensor, w: Tensor, b: Tensor | None = None) -> Tensor:
    """The route of a product that palitorch's kernel does not take (and what `_calibrate_skinny` times it
    against): oneDNN's kernel where it pays, else `F.linear`."""
    if _wants_onednn(x, w):
        return onednn_linear(x, w, b) if torch.compiler.is_compiling() else _pointwise(x, w, b)
    return F.linear(x, w, b)


def _calibrate_skinny(dtype: torch.dtype = torch.float32, rows=(1, 4, 8, 12, 16), reps: int = 7) -> int:
    """The most rows (of `rows`) up to which palitorch's kernel beat the route such products otherwise take here
    (oneDNN's or F.linear), timed once per process and dtype on 128 MB of 4096 x 1024 weights (eight in float32:
    beyond the caches, as a decode step's weights are; over 64 MB, partly cached on the Intel VM, reading a weight
    twice looked cheap and 16 rows in two passes won there, but lost 0.8x on a real step's weights), the two
    interleaved, medians; 0 if it loses at one row. ~0.6 s."""
    ws = [torch.ones(4096, 1024, dtype=dtype) for _ in range(32 // dtype.itemsize)]
    best = 0
    with torch.no_grad():
        for m in rows:
            x = torch.ones(m, 1024, dtype=dtype)
            times: dict = {_skinny_op: [], _other_route: []}
            for _ in range(reps):
                for fn, ts in times.items():
                    start = time.perf_counter()
                    for w in ws:
                        fn(x, w)
                    ts.append(time.perf_counter() - start)
            if statistics.median(times[_skinny_op]) >= statistics.median(times[_other_route]):
                break
            best = m
    return best


def skinny_max_rows(dtype: torch.dtype = torch.float32) -> int:
    """Products of at most this many rows (by large weights of this dtype) go through palitorch's kernel here: 0
    where it is unavailable or was not faster. Checked and timed on the first call for a dtype (a build of a few
    seconds the first time on a machine, see palitorch.native; ~0.6 s after that); `SKINNY_MAX_ROWS` overrides
    the timing."""
    if dtype not in SKINNY_DTYPES or not _skinny_works():
        return 0
    if SKINNY_MAX_ROWS is not None:
        return SKINNY_MAX_ROWS
    if dtype not in _skinny["max_rows"]:
        _skinny["max_rows"][dtype] = _calibrate_skinny(dtype)
    return _skinny["max_rows"][dtype]


def _wants_skinny(x: Tensor, w: Tensor) -> bool:
    if not (_skinny["enabled"] and x.device.type == "cpu" and x.dtype == w.dtype and w.dtype in SKINNY_DTYPES
            and w.dim() == 2 and w.numel() >= SKINNY_MIN_ELEMENTS and w.is_contiguous()):
        return False
    rows = x.numel() // x.shape[-1]
    if SKINNY_MAX_ROWS is None and w.numel() < SKINNY_TIMED_ELEMENTS:
        # A small weight: the untimed bound, for a build with a vector path (measured: AVX-512 builds; AVX2's path is
        # the same code at half the width; the plain C++ one would lose to BLAS).
        return rows <= SKINNY_SMALL_MAX_ROWS and bool(_skinny["works"]) and _skinny["lanes"] >= 8
    limit = SKINNY_MAX_ROWS if SKINNY_MAX_ROWS is not None else _skinny["max_rows"].get(w.dtype, 0)
    return bool(_skinny["works"]) and rows <= limit


def prepare(weights) -> None:
    """Run now the one-time checks and timings that the routes of these weights depend on (building palitorch's
    kernel the first time on a machine, see palitorch.native): `linear` only reads their verdicts, process-wide,
    and until they are in takes `F.linear`. A Pipeline calls this with its model's parameters when it is made."""
    largest: dict = {}  # dtype -> the most entries of a CPU matrix of it
    for w in weights:
        if w.device.type == "cpu" and w.dim() == 2:
            largest[w.dtype] = max(largest.get(w.dtype, 0), w.numel())
    if _skinny["enabled"]:
        for dtype in SKINNY_DTYPES:
            if largest.get(dtype, 0) >= SKINNY_TIMED_ELEMENTS:
                skinny_max_rows(dtype)
            elif largest.get(dtype, 0) >= SKINNY_MIN_ELEMENTS:
                _skinny_works()
    if _onednn["enabled"] and largest.get(torch.float32, 0) >= ONEDNN_MIN_ELEMENTS and _onednn_works():
        _min_rows()


def linear(x: Tensor, w: Tensor, b: Tensor | None = None) -> Tensor:
    """x [..., in] @ w[out, in].T + b: `F.linear`, or palitorch's or oneDNN's kernel where they pay (see the module
    docstring). With autograd on (neither kernel has a backward) or under CPU autocast, always `F.linear`."""
    if torch.is_grad_enabled() or torch.is_autocast_enabled("cpu"):
        return F.linear(x, w, b)
    return _skinny_op(x, w, b) if _wants_skinny(x, w) else _other_route(x, w, b)


ROW_BLOCK_BYTES = 16 << 20  # `in_row_blocks`: the widest intermediate of a block of rows, at most
ROW_BLOCK_MIN_ROWS = 128  # and at least this many rows a block (fewer re-read the weights too often)


def blocks_apply(x: Tensor) -> bool:
    """Whether work on x may be split into blocks (`in_row_blocks`, Gemma 2's attention): at CPU inference, outside
    a compiled graph (whose memory inductor plans); with autograd on or on other devices it runs whole."""
    return x.device.type == "cpu" and not torch.is_grad_enabled() and not torch.compiler.is_compiling()


def in_row_blocks(fn, x: Tensor, width: int) -> Tensor:
    """fn(x) for an fn that treats each row of x [..., C] on its own (an MLP block: norm, products, activation),
    run on blocks of x's rows at CPU inference so that its widest intermediate, `width` values a row, stays within
    ROW_BLOCK_BYTES (at least ROW_BLOCK_MIN_ROWS rows a block). A prefill of many rows otherwise makes intermediates
    of tens or hundreds of MB (the 3B models' gate/up product at batch 8: 280 MB in float32), which glibc's malloc
    takes from the system afresh each time (above 32 MB it always maps new pages) and which leave the caches: the
    mid-size benchmark model's batch-8 MLP ran 5-15% faster in 512-row blocks (BENCHMARKS.md, session 20). Rows
    give the same results as a whole, up to the BLAS kernel's float32 rounding for another number of rows. Where
    `blocks_apply` says no: fn(x) at once."""
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    per = max(ROW_BLOCK_MIN_ROWS, ROW_BLOCK_BYTES // max(1, width * x.element_size()))
    if rows <= per or not blocks_apply(x):
        return fn(x)
    flat, out = x.reshape(rows, x.shape[-1]), None
    for start in range(0, rows, per):
        y = fn(flat[start:start + per])
        if out is None:
            out = y.new_empty(rows, y.shape[-1])
        out[start:start + per] = y
    return out.view(*x.shape[:-1], out.shape[-1])


HUGE_PAGE = 2 << 20  # x86-64's transparent huge page: the alignment of what `use_huge_pages` allocates
HUGE_PAGES_MIN_BYTES = 2 << 20  # smaller tensors stay where they are


def _thp_mode() -> str:
    """Linux's transparent-huge-page setting ("always", "madvise" or "never"); "never" elsewhere."""
    try:
        text = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return "never"
    return text.split("[", 1)[1].split("]", 1)[0] if "[" in text else "never"


def _huge_bytes(nbytes: int) -> Tensor:
    """nbytes of CPU memory (uint8) from a huge-page boundary, advised for transparent huge pages."""
    buf = mmap.mmap(-1, nbytes + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    start = -ctypes.addressof(ctypes.c_char.from_buffer(buf)) % HUGE_PAGE
    buf.madvise(mmap.MADV_HUGEPAGE, start, nbytes)
    return torch.frombuffer(buf, dtype=torch.uint8, count=nbytes, offset=start)  # keeps `buf` alive


def use_huge_pages(tensors) -> int:
    """Move these CPU tensors (those of HUGE_PAGES_MIN_BYTES or more) into memory backed by transparent huge pages,
    where Linux offers them ("always" or "madvise"): fewer TLB misses when a decode step reads its weights (the
    mid-size model's batch-8 step ~20% faster on the Intel VM of BENCHMARKS.md; one row unchanged). Values are
    unchanged, and tensors that shared memory still do (the views of a fused matrix stay views); a tensor that cannot
    move (no memory for the copy) stays where it is. -> bytes moved."""
    if not hasattr(mmap, "MADV_HUGEPAGE") or _thp_mode() not in ("always", "madvise"):
        return 0
    groups: dict = {}  # storage -> the tensors in it (all of them move together, so views stay views)
    for t in tensors:
        if t.device.type == "cpu":
            groups.setdefault(t.untyped_storage().data_ptr(), {})[id(t)] = t
    moved = 0
    with torch.no_grad():
        for ptr, group in groups.items():
            ts = list(group.values())
            size = ts[0].element_size()
            if (max(t.numel() for t in ts) * size < HUGE_PAGES_MIN_BYTES or ptr % HUGE_PAGE == 0  # small, or moved
                    or any(t.element_size() != size for t in ts)):
                continue
            last = [t.storage_offset() + sum((n - 1) * st for n, st in zip(t.shape, t.stride())) for t in ts]
            lo, hi = min(t.storage_offset() for t in ts) * size, (max(last) + 1) * size  # bytes the group spans
            try:
                new = _huge_bytes(hi - lo)
            except (OSError, ValueError):  # no memory for the copy, or madvise refused: leave it (only speed is lost)
                continue
            new.copy_(torch.empty(0, dtype=torch.uint8).set_(ts[0].untyped_storage())[lo:hi])
            for t in ts:
                view = torch.empty(0, dtype=t.dtype).set_(new.untyped_storage(), t.storage_offset() - lo // size,
                                                          t.shape, t.stride())
                t.data = view
            moved += hi - lo
    return moved


class Linear(nn.Linear):
    """nn.Linear (same parameters, same state-dict keys) whose forward goes through `linear`."""

    def forward(self, x: Tensor) -> Tensor:
        return linear(x, self.weight, self.bias)
