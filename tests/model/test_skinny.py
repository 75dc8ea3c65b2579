"""palitorch's own CPU kernel for a few rows by a large weight (palitorch/native, palitorch.model.kernels): it builds
here, equals F.linear, is cached per machine, fails soft, and takes only the products it is meant for.

Tolerance: the kernel sums in another order than MKL, so results agree to float32 rounding: within 1e-4 relative +
1e-4 absolute (outputs of order 1-30, sums of up to 1,100 products of N(0, 1) numbers; also checked relative to
the output's scale). In bfloat16 the sums are float32 and rounded once, so the result is within one bfloat16 step
(2^-7 relative, at most) of the float32 product rounded to bfloat16.
"""

import os
import subprocess
import sys
import time
import types

import pytest
import torch
import torch.nn.functional as F

from palitorch import native
from palitorch.model import kernels


def _close(got, want):
    scale = want.abs().max().item() if want.numel() else 0.0
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * max(1.0, scale / 10))


@pytest.mark.parametrize("k", [1, 15, 16, 33, 72, 1100])
@pytest.mark.parametrize("n", [1, 7, 83, 300])
def test_skinny_linear_equals_f_linear(skinny_calls, n, k):
    """Every row count of one block of up to 12 (each has its own code path), two and three blocks, no rows, weight
    rows that do not split evenly over threads and streams, lengths that are no multiple of the vector width."""
    g = torch.Generator().manual_seed(n * 1000 + k)
    w = torch.randn(n, k, generator=g)
    op = torch.ops.palitorch.skinny_linear
    for m in [0, *range(1, 14), 24, 29]:
        x = torch.randn(m, k, generator=g)
        _close(op(x, w), F.linear(x, w))


@pytest.mark.parametrize("dtype, n, k", [(torch.float32, 300, 1100), (torch.bfloat16, 300, 1100),
                                         (torch.bfloat16, 320, 1024)])
def test_a_rows_result_does_not_depend_on_the_other_rows(skinny_calls, dtype, n, k):
    """Each output is summed in one order whatever the number of rows and their blocking: a row's result is the
    same to the bit alone, among 2-13 rows, or in a later block of 29, so a request's numbers do not depend on
    what it was batched with (as far as this kernel goes). The last shape takes the AMX path where there is one."""
    g = torch.Generator().manual_seed(7)
    w = torch.randn(n, k, generator=g).to(dtype)
    x = torch.randn(29, k, generator=g).to(dtype)
    op = torch.ops.palitorch.skinny_linear
    alone = torch.cat([op(x[i:i + 1], w) for i in range(29)])
    for m in [2, 3, 4, 5, 6, 7, 8, 12, 13, 29]:  # every block size, each with its own number of streams
        assert torch.equal(op(x[:m], w), alone[:m]), m
    assert torch.equal(op(x[13:], w), alone[13:])


def _close_bf16(got, want32):
    """`got` (bfloat16) against the float32 product `want32`: one bfloat16 step apart at most (both are that
    product up to float32 rounding, rounded to bfloat16 once)."""
    assert got.dtype == torch.bfloat16
    scale = want32.abs().max().item() if want32.numel() else 0.0
    torch.testing.assert_close(got.float(), want32.bfloat16().float(), rtol=2 ** -7, atol=1e-4 * max(1.0, scale))


@pytest.mark.parametrize("n, k", [(7, 15), (83, 72), (300, 1100), (64, 4096), (320, 1024)])
def test_skinny_linear_bfloat16(skinny_calls, n, k):
    """bfloat16 weights and inputs: every row count of a block and more, lengths that are no multiple of the vector
    width; against the float32 product of the same numbers, and against torch's own bfloat16 kernel. The last two
    shapes (k a multiple of 32, n of 16) take the AMX path where the CPU has AMX, in blocks of 16 rows."""
    g = torch.Generator().manual_seed(n * 1000 + k)
    w = torch.randn(n, k, generator=g).bfloat16()
    op = torch.ops.palitorch.skinny_linear
    for m in [0, *range(1, 18), 29, 40]:
        x = torch.randn(m, k, generator=g).bfloat16()
        got = op(x, w)
        _close_bf16(got, F.linear(x.float(), w.float()))
        scale = got.float().abs().max().item() if m else 0.0
        torch.testing.assert_close(got, F.linear(x, w), rtol=2 ** -7, atol=1e-4 * max(1.0, scale))
    with pytest.raises(RuntimeError, match="must both be float32 or both bfloat16"):
        op(torch.randn(1, k), w)


def test_inputs_of_any_layout_and_a_bias(skinny_calls):
    g = torch.Generator().manual_seed(0)
    fused = torch.randn(3 * 96, 64, generator=g)
    w, b = fused[96:192], torch.randn(96, generator=g)  # a row view of a fused matrix, as fuse_projections leaves
    x = torch.randn(2, 5, 64, generator=g)
    with torch.no_grad():
        for a in (x[0], x[:, -1:], x.transpose(0, 1)[:3], x[0, 0], x):  # the last: 10 rows, another route
            _close(kernels.linear(a, w, b), F.linear(a, w, b))
            assert kernels.linear(a, w).shape == a.shape[:-1] + (96,)
    assert skinny_calls["skinny"] == 2 * 4


def test_route_takes_few_rows_at_inference_only(skinny_calls, monkeypatch):
    w = torch.randn(32, 16)
    kernels.linear(torch.randn(4, 16), w.requires_grad_())  # autograd on: F.linear (the kernel has no backward)
    assert skinny_calls["skinny"] == 0
    w = w.detach()
    with torch.no_grad():
        kernels.linear(torch.randn(9, 16), w)  # more rows than the route takes
        kernels.linear(torch.randn(4, 16).double(), w.double())  # not float32 or bfloat16
        kernels.linear(torch.randn(4, 16).half(), w.half())
        kernels.linear(torch.randn(4, 16), w.t().contiguous().t())  # a transposed weight
        monkeypatch.setattr(kernels, "SKINNY_MIN_ELEMENTS", w.numel() + 1)
        kernels.linear(torch.randn(4, 16), w)  # too small a weight
        assert skinny_calls["skinny"] == 0
        monkeypatch.setattr(kernels, "SKINNY_MIN_ELEMENTS", w.numel())
        kernels.linear(torch.randn(2, 4, 16), w)  # 8 rows
        kernels.linear(torch.randn(2, 4, 16).bfloat16(), w.bfloat16())
        assert skinny_calls["skinny"] == 2
        with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast asks F.linear for bfloat16 products
            y = kernels.linear(torch.randn(4, 16), w)
        assert y.dtype == torch.bfloat16 and skinny_calls["skinny"] == 2
        kernels.use_skinny(False)
        try:
            kernels.linear(torch.randn(1, 16), w)
        finally:
            kernels.use_skinny(True)
        assert skinny_calls["skinny"] == 2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_graph_calls_the_kernel(skinny_calls, dtype):
    """Inside torch.compile the route is the op itself (its meta kernel gives the trace its shapes and dtype);
    inductor calls it from the graph."""
    lin = kernels.Linear(64, 96).to(dtype)
    x = torch.randn(2, 1, 64, dtype=dtype)
    seen = []

    def record(gm, inputs):
        seen.extend(str(node.target) for node in gm.graph.nodes if node.op == "call_function")
        return gm

    def f(x):
        return torch.tanh(lin(x)) * 2

    with torch.no_grad():
        eager = f(x)
        torch.compile(f, backend=record, dynamic=False)(x)
        compiled = torch.compile(f, dynamic=False)(x)
    assert "palitorch.skinny_linear.default" in seen or "palitorch.skinny_linear" in seen, seen
    assert compiled.dtype == dtype
    if dtype == torch.float32:
        _close(compiled, eager)
    else:  # inductor keeps tanh(y) * 2 in float32 and rounds once; eager rounds after each op
        torch.testing.assert_close(compiled.float(), eager.float(), rtol=2 ** -7, atol=2 ** -7)


def test_calibration_finds_the_rows_up_to_which_the_kernel_wins(monkeypatch):
    """With both routes replaced by waits (the other route 0.5 ms a product; the kernel 0.1 ms up to 4 rows and 2 ms
    above), the timing says 4; the kernel slow everywhere, 0. Only the waits are timed, so the answer does not
    depend on this CPU's real kernels (on an AMD EPYC, MKL at 8 rows is slower than the kernel by more than any
    margin a test could add to it)."""
    monkeypatch.setitem(kernels._skinny, "works", True)

    def other(x, w, b=None):
        time.sleep(0.0005)

    def slow_above(m):
        def op(x, w, b=None):
            time.sleep(0.002 if x.shape[0] > m else 0.0001)
        return op

    monkeypatch.setattr(kernels, "_other_route", other)
    monkeypatch.setattr(kernels, "_skinny_op", slow_above(4))
    assert kernels._calibrate_skinny(reps=3) == 4
    assert kernels._calibrate_skinny(torch.bfloat16, reps=3) == 4
    monkeypatch.setattr(kernels, "_skinny_op", slow_above(0))
    assert kernels._calibrate_skinny(reps=3) == 0


def _load_in_subprocess(env: dict) -> subprocess.CompletedProcess:
    code = ("import logging, sys; logging.basicConfig(level=logging.INFO, stream=sys.stdout); "
            "import palitorch.native as n; print('loaded', n.load())")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                          env={**os.environ, **env})


def test_build_is_cached_per_machine_and_fails_soft(tmp_path):
    """A fresh cache: the first process compiles, the next loads the library it left; an unusable cache folder
    falls back to the temporary folder; a broken compiler or the switch leave palitorch on torch's kernels, saying
    why in one log line."""
    first = _load_in_subprocess({"PALITORCH_CACHE": str(tmp_path)})
    assert "loaded True" in first.stdout and "compiling" in first.stdout, first.stdout + first.stderr
    assert len(list((tmp_path / "native").glob("skinny_linear-*.so"))) == 1
    again = _load_in_subprocess({"PALITORCH_CACHE": str(tmp_path)})
    assert "loaded True" in again.stdout and "compiling" not in again.stdout
    assert len(list((tmp_path / "native").iterdir())) == 1  # no temporary file left behind

    (tmp_path / "file").write_text("")  # a cache folder that cannot be made: the system's temporary folder instead
    elsewhere = _load_in_subprocess({"PALITORCH_CACHE": str(tmp_path / "file" / "x")})
    assert "loaded True" in elsewhere.stdout, elsewhere.stdout + elsewhere.stderr

    broken = _load_in_subprocess({"PALITORCH_CACHE": str(tmp_path / "b"), "CXX": "false"})
    assert "loaded False" in broken.stdout and "compiler failed" in broken.stdout, broken.stdout
    assert len([ln for ln in broken.stdout.splitlines() if "unavailable" in ln]) == 1
    off = _load_in_subprocess({"PALITORCH_CACHE": str(tmp_path / "c"), "PALITORCH_NATIVE": "0"})
    assert "loaded False" in off.stdout and not (tmp_path / "c").exists()


def test_a_failed_build_routes_nothing(monkeypatch):
    monkeypatch.setitem(kernels._skinny, "works", None)
    monkeypatch.setitem(kernels._skinny, "lanes", kernels._skinny["lanes"])  # restored with "works" afterwards
    monkeypatch.setattr(native, "load", lambda: False)
    assert kernels.skinny_max_rows() == 0
    with torch.no_grad():
        monkeypatch.setattr(kernels, "SKINNY_MIN_ELEMENTS", 0)
        monkeypatch.setattr(kernels, "_skinny_op", types.SimpleNamespace())  # would fail if called
        x, w = torch.randn(1, 16), torch.randn(8, 16)
        _close(kernels.linear(x, w), F.linear(x, w))


@pytest.mark.parametrize("flags, lanes", [("-mno-avx512f -mno-amx-tile", 8), ("-mno-avx2 -mno-fma -mno-avx512f", 1)])
def test_other_vector_paths_equal_f_linear(tmp_path, flags, lanes):
    """The kernel's AVX2 and plain C++ paths (for CPUs without AVX-512, or other architectures), built here by
    turning the wider instructions off; each checked against F.linear as above (float32, bfloat16 and int8
    weights), in its own process. The AVX2 build also leaves AMX and the AVX512-BF16 pair products out, so its
    bfloat16 products all take the widening path; the plain build keeps AMX where the CPU has it."""
    import platform

    if platform.machine().lower() not in ("x86_64", "amd64"):
        pytest.skip("the flags are x86's")
    code = (
        "import torch, torch.nn.functional as F, palitorch.native as n; assert n.load(); "
        f"assert torch.ops.palitorch.skinny_lanes() == {lanes}, torch.ops.palitorch.skinny_lanes(); "
        "g = torch.Generator().manual_seed(0)\n"
        f"assert {lanes} == 1 or not torch.ops.palitorch.skinny_amx()\n"
        "assert not torch.ops.palitorch.skinny_pairs()\n"
        "for n_, k in [(83, 72), (300, 1100), (7, 15), (64, 1024)]:\n"
        "    w = torch.randn(n_, k, generator=g)\n"
        "    for m in [0, *range(1, 18), 29]:\n"
        "        x = torch.randn(m, k, generator=g)\n"
        "        torch.testing.assert_close(torch.ops.palitorch.skinny_linear(x, w), F.linear(x, w), "
        "rtol=1e-4, atol=3e-4)\n"
        "        y = torch.ops.palitorch.skinny_linear(x.bfloat16(), w.bfloat16())\n"
        "        want = F.linear(x.bfloat16().float(), w.bfloat16().float()).bfloat16().float()\n"
        "        torch.testing.assert_close(y.float(), want, rtol=2 ** -7, atol=3e-3)\n"
        "        q = torch.randint(-127, 128, (n_, k), generator=g, dtype=torch.int8)\n"  # int8 weights: float32 out
        "        y = torch.ops.palitorch.skinny_linear(x, q)\n"
        "        assert y.dtype == torch.float32\n"
        "        torch.testing.assert_close(y, F.linear(x, q.float()), rtol=1e-4, atol=1e-2)\n"
        "print('ok')")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PALITORCH_CACHE": str(tmp_path), "PALITORCH_NATIVE_CFLAGS": flags})
    assert done.stdout.strip() == "ok", done.stdout + done.stderr


def test_the_widest_vector_code_this_cpu_has_is_built(skinny_calls):
    try:
        flags = next(ln for ln in open("/proc/cpuinfo").read().splitlines() if ln.startswith("flags")).split()
    except (OSError, StopIteration):
        pytest.skip("no /proc/cpuinfo flags here")
    want = 16 if "avx512f" in flags else 8 if {"avx2", "fma"} <= set(flags) else 1
    assert torch.ops.palitorch.skinny_lanes() == want
    # AMX for bfloat16 where the CPU (and the Linux that reports it) has it
    assert torch.ops.palitorch.skinny_amx() == ({"amx_tile", "amx_bf16"} <= set(flags))
    # else AVX512-BF16's pair products where the CPU has them (the build follows the CPU's flags, not the OS's)
    assert torch.ops.palitorch.skinny_pairs() == ({"avx512f", "avx512_bf16"} <= set(flags)
                                                  and not {"amx_tile", "amx_bf16"} <= set(flags))


def test_prepare_runs_the_checks_a_compiled_graph_reads(monkeypatch):
    """`prepare` (which `Pipeline.compile` calls) settles eagerly what a compiled graph's routes read: the
    self-check for a model with a weight large enough for the route, the row bound too for one with a weight large
    enough to be timed, nothing for one without."""
    monkeypatch.setitem(kernels._skinny, "works", None)
    monkeypatch.setitem(kernels._skinny, "max_rows", {})
    monkeypatch.setattr(kernels, "_calibrate_skinny", lambda dtype: {torch.float32: 5, torch.bfloat16: 3}[dtype])
    least, big = kernels.SKINNY_MIN_ELEMENTS, kernels.SKINNY_TIMED_ELEMENTS
    tiny = [torch.zeros(least // 2, 1), torch.zeros(big, 1, dtype=torch.float64),
            torch.zeros(big, dtype=torch.bfloat16)]
    kernels.prepare(tiny)
    assert kernels._skinny["works"] is None and kernels._skinny["max_rows"] == {}
    kernels.prepare([*tiny, torch.zeros(least, 1)])  # a small model's weight: the self-check, no timing
    assert kernels._skinny["works"] is True and kernels._skinny["max_rows"] == {}
    kernels.prepare([*tiny, torch.zeros(big, 1)])
    assert kernels._skinny["max_rows"] == {torch.float32: 5}
    kernels.prepare([torch.zeros(big, 1, dtype=torch.bfloat16)])  # each dtype is timed apart
    assert kernels._skinny["max_rows"] == {torch.float32: 5, torch.bfloat16: 3}
    with torch.no_grad():  # what a trace then decides, from the verdicts alone
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
        w = torch.zeros(big // 64, 64)
        assert kernels._wants_skinny(torch.zeros(5, 64), w) and not kernels._wants_skinny(torch.zeros(6, 64), w)
        w, x = w.bfloat16(), torch.zeros(3, 64, dtype=torch.bfloat16)
        assert kernels._wants_skinny(x, w) and not kernels._wants_skinny(torch.zeros(4, 64, dtype=torch.bfloat16), w)
        assert not kernels._wants_skinny(x.half(), w.half())
        small = torch.zeros(least // 64, 64)  # below the timed size: up to SKINNY_SMALL_MAX_ROWS rows, both dtypes
        rows = kernels.SKINNY_SMALL_MAX_ROWS
        monkeypatch.setitem(kernels._skinny, "lanes", 8)  # a build with a vector path (AVX2)
        for dtype in (torch.float32, torch.bfloat16):
            assert kernels._wants_skinny(torch.zeros(rows, 64, dtype=dtype), small.to(dtype))
            assert not kernels._wants_skinny(torch.zeros(rows + 1, 64, dtype=dtype), small.to(dtype))
        assert not kernels._wants_skinny(torch.zeros(1, 64), torch.zeros(least // 64 - 1, 64))  # below the floor
        monkeypatch.setitem(kernels._skinny, "lanes", 1)  # the plain C++ build: small weights keep BLAS
        assert not kernels._wants_skinny(torch.zeros(1, 64), small)
        assert kernels._wants_skinny(torch.zeros(5, 64), w.float())  # large ones keep their timed bound


def test_small_weights_take_the_kernel_without_the_timing(monkeypatch):
    """A small model's weights (from SKINNY_MIN_ELEMENTS up to SKINNY_TIMED_ELEMENTS) go to palitorch's kernel at up
    to SKINNY_SMALL_MAX_ROWS rows after the self-check alone, in a build with a vector path: eager callers (a CLI run
    of the bundled model) do not pay the ~0.6 s timing, which measures streaming large weights. Same products as
    F.linear."""
    monkeypatch.setitem(kernels._skinny, "max_rows", {})
    monkeypatch.setattr(kernels, "_calibrate_skinny", lambda dtype: pytest.fail("timed for a small weight"))
    assert kernels._skinny_works()  # the self-check (its own products are not counted below)
    calls, real = [], kernels._skinny_op
    monkeypatch.setattr(kernels, "_skinny_op", lambda x, w, b=None: calls.append(len(x)) or real(x, w, b))
    g = torch.Generator().manual_seed(0)
    w = torch.randn(kernels.SKINNY_MIN_ELEMENTS // 128, 128, generator=g)  # 512 x 128: the bundled MLP's size
    rows = kernels.SKINNY_SMALL_MAX_ROWS
    with torch.no_grad():
        for dtype in (torch.float32, torch.bfloat16):
            for m in (1, rows, rows + 1):
                x = torch.randn(m, 128, generator=g).to(dtype)
                want = F.linear(x.float(), w.to(dtype).float())
                got = kernels.linear(x, w.to(dtype))
                _close(got, want) if dtype == torch.float32 else _close_bf16(got, want)
        kernels.linear(torch.randn(1, 64), torch.randn(kernels.SKINNY_MIN_ELEMENTS // 64 - 1, 64))  # below the floor
    vector = kernels._skinny["lanes"] >= 8  # this machine's build has a vector path (any x86-64 with AVX2)
    assert calls == ([1, rows] * 2 if vector else [])
    monkeypatch.setitem(kernels._skinny, "lanes", 1)  # the plain C++ build: small weights keep BLAS
    with torch.no_grad():
        kernels.linear(torch.randn(1, 128), w)
    assert calls == ([1, rows] * 2 if vector else [])
