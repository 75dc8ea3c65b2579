"""palitorch's own CPU kernels, compiled for this machine on first use (when a Pipeline is made) and cached.

One kernel so far: `palitorch::skinny_linear` (skinny_linear.cpp), a product of a few rows by a large float32 or
bfloat16 weight that reads the weight faster than torch's kernels do on the machines measured (see the source and
`model/kernels.py`, which decides where it runs). It is built with the C++ compiler that `torch.compile` also needs
on CPU (`$CXX`, else `c++`), against the installed torch's headers, with `-march=native`, into
`$PALITORCH_CACHE/native` (default `$XDG_CACHE_HOME/palitorch/native`, else `~/.cache/palitorch/native`; the
system temporary folder if that cannot be made), once per source, torch version, compiler and CPU: a few seconds.
Where anything fails (no compiler, an unsupported platform, a build error) `load()` says False once in the log and
palitorch runs with torch's kernels, as it does with `PALITORCH_NATIVE=0`.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("skinny_linear.cpp")
_state: dict = {"loaded": None}
_lock = threading.Lock()
log = logging.getLogger(__name__)


def cache_dir() -> Path:
    if os.environ.get("PALITORCH_CACHE"):
        return Path(os.environ["PALITORCH_CACHE"]) / "native"
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "palitorch" / "native"


def _cpu_fingerprint() -> str:
    """What -march=native depends on: the CPU's model and feature flags (a cached build must not run elsewhere)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        keep = [ln for ln in lines if ln.split(":")[0].strip() in ("model name", "flags", "Features", "CPU part")]
        return "\n".join(sorted(set(keep)))
    except OSError:
        return platform.processor()


def _command(compiler: str, source: Path, out: Path) -> list[str]:
    """The build command; `$PALITORCH_NATIVE_CFLAGS` adds flags (the tests build the AVX2 and plain C++ paths on a
    machine with AVX-512 with "-mno-avx512f -mno-amx-tile" and "-mno-avx2 -mno-fma -mno-avx512f")."""
    root = Path(torch.__file__).parent
    abi = int(getattr(torch._C, "_GLIBCXX_USE_CXX11_ABI", True))
    extra = os.environ.get("PALITORCH_NATIVE_CFLAGS", "").split()
    return [compiler, "-O3", "-march=native", *extra, "-fopenmp", "-shared", "-fPIC", "-std=c++20", "-w",
            f"-D_GLIBCXX_USE_CXX11_ABI={abi}", f"-I{root / 'include'}", f"-I{root / 'include/torch/csrc/api/include'}",
            str(source), f"-L{root / 'lib'}", f"-Wl,-rpath,{root / 'lib'}", "-lc10", "-ltorch_cpu", "-o", str(out)]


def _build() -> Path:
    """The kernel library for this machine: from the cache, or compiled now (raises on failure)."""
    compiler = shutil.which(os.environ.get("CXX", "c++"))
    if compiler is None:
        raise RuntimeError(f"no C++ compiler ({os.environ.get('CXX', 'c++')!r}) on PATH")
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=60).stdout
    source = SOURCE.read_text()
    key = hashlib.sha256("\0".join([source, torch.__version__, version, platform.machine(), _cpu_fingerprint(),
                                    " ".join(_command("cxx", SOURCE, Path("out")))]).encode()).hexdigest()[:20]
    out = cache_dir() / f"skinny_linear-{key}.so"
    if out.exists():
        return out
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError:  # e.g. a read-only home: the system's temporary folder, per user
        out = Path(tempfile.gettempdir()) / f"palitorch-native-{os.getuid()}" / out.name
        if out.exists():
            return out
        out.parent.mkdir(parents=True, exist_ok=True)
    log.info("palitorch: compiling its CPU kernels for this machine (once; a few seconds)")
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)  # several processes may build at once: each its own
    os.close(fd)
    try:
        done = subprocess.run(_command(compiler, SOURCE, Path(tmp)), capture_output=True, text=True, timeout=600)
        if done.returncode != 0:
            lines = done.stderr.strip().splitlines() or ["?"]
            raise RuntimeError("compiler failed: " + next((ln for ln in lines if "error" in ln), lines[-1]))
        os.replace(tmp, out)  # atomic: a reader sees no library or a whole one
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


def load() -> bool:
    """Whether `torch.ops.palitorch.skinny_linear` is available, building and loading it on the first call (CPU
    builds of torch on Linux and macOS; False under `PALITORCH_NATIVE=0` or if anything fails, said once in the
    log)."""
    with _lock:
        if _state["loaded"] is None:
            _state["loaded"] = False
            if os.environ.get("PALITORCH_NATIVE", "1") == "0" or platform.system() not in ("Linux", "Darwin"):
                return False
            try:
                torch.ops.load_library(str(_build()))
                _state["loaded"] = hasattr(torch.ops.palitorch, "skinny_linear")
            except (OSError, RuntimeError, subprocess.SubprocessError) as e:
                log.warning("palitorch: its CPU kernels are unavailable (%s); using torch's "
                            "(PALITORCH_NATIVE=0 skips the attempt)", e)
        return _state["loaded"]
