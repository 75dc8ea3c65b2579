"""benchmarks/bench_gpu.sh's time limits, with `timeout` and python stood in for (the GPU run has one device call of
at most 10 minutes: the script must end inside it whatever each size takes, and not waste a size's unused time)."""

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_gpu.sh"

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")


def run(tmp_path: Path, sizes: str, sleep: bool = False, **env) -> tuple[list[int], float, str]:
    """Run the script with a `timeout` that records the limit it is given (and with `sleep`, runs that long, as a size
    that uses all its time) -> (the limits, in order; wall seconds; output)."""
    stubs, log = tmp_path / "stubs", tmp_path / "limits"
    stubs.mkdir(exist_ok=True)
    stub = stubs / "timeout"
    stub.write_text(f'#!/bin/sh\necho "$1" >> {log}\n' + ('sleep "$1"; exit 124\n' if sleep else ""))
    stub.chmod(0o755)
    base = {k: v for k, v in os.environ.items() if k not in ("SIZE_LIMIT_S", "BUDGET_S", "GPU_TESTS")}
    env = {**base, "PATH": f"{stubs}:{os.environ['PATH']}", "PY": "true", "OUT": str(tmp_path / "out"),
           "SIZES": sizes, **env}
    t0 = time.monotonic()
    proc = subprocess.Popen(["bash", str(SCRIPT)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        out = proc.communicate(timeout=30)[0]
    except subprocess.TimeoutExpired:  # (the script and its stand-ins, which would sleep on)
        os.killpg(proc.pid, signal.SIGKILL)
        out = proc.communicate()[0] + "\n(killed after 30 s)"
    wall = time.monotonic() - t0
    return [int(x) for x in log.read_text().split()] if log.exists() else [], wall, out


def test_a_size_gets_its_share_and_the_next_one_what_it_left(tmp_path):
    """Two sizes in a budget of 100 s: the first at most half (it cannot starve the second); one that ends at once
    leaves the second (nearly) the whole budget. (The limits were a fixed 285 s each, 570 s in all plus the start,
    and a size could not use the time another left.)"""
    limits, _, out = run(tmp_path, "stub-size-a stub-size-b", BUDGET_S="100")
    assert 45 <= limits[0] <= 50 and limits[1] >= 90, out  # (a loaded machine may take seconds to start)
    (tmp_path / "capped").mkdir()
    limits, _, out = run(tmp_path / "capped", "stub-size-a stub-size-b", BUDGET_S="100", SIZE_LIMIT_S="30")
    assert limits == [30, 30], out


def test_sizes_that_use_all_their_time_end_within_the_budget(tmp_path):
    limits, _, out = run(tmp_path, "stub-size-a stub-size-b", sleep=True, BUDGET_S="6")
    assert len(limits) == 2 and 0 < limits[0] <= 3 and sum(limits) <= 6, out  # (the first second may be gone)
    assert "did not finish (exit 124)" in out, out
