"""MLX's CPU backend on Linux: use the system's OpenBLAS when it is installed.

The mlx[cpu] wheel links a reference BLAS; with OpenBLAS preloaded, MLX's matrix-matrix
products (prefill, the training-free selector's scoring pass) run ~6-17x faster here. A
library can only be preloaded before the process starts, so the `ifprune` entry point
re-executes itself once with LD_PRELOAD naming OpenBLAS's BLAS. Without OpenBLAS, one note
(once per cache folder) says how to get it. IFPRUNE_BLAS=0 turns this off. macOS uses
Accelerate and Metal: nothing to do.

A server computes and serves on the same cores: set_threads(serving_threads()) leaves one
core to the HTTP loop and the worker's Python (OpenBLAS's idle threads spin, and on a small
machine they take the core those need; docs/SERVER.md measures it).
"""

from __future__ import annotations

import ctypes
import glob
import os
import sys

MARK = "IFPRUNE_BLAS"  # the preloaded library in the re-executed process; "0" to opt out
INSTALL_HINT = "apt-get install libopenblas0-pthread (Debian/Ubuntu)"
_PATTERNS = ("/usr/lib/*-linux-gnu/openblas-pthread/libblas.so.3", "/usr/lib64/openblas-pthread/libblas.so.3",
             "/usr/lib/*-linux-gnu/libopenblas.so.0", "/usr/lib64/libopenblas.so.0", "/usr/lib/libopenblas.so.0")


def openblas_path() -> str | None:
    """The system's OpenBLAS BLAS library, if installed."""
    for pattern in _PATTERNS:
        found = sorted(glob.glob(pattern))
        if found:
            return found[0]
    return None


def active_blas() -> str:
    """Which BLAS this process's MLX uses, in a few words (for `ifprune info`)."""
    if sys.platform != "linux":
        return "the platform's (Accelerate / Metal)"
    library = _preloaded()
    if library:
        return f"OpenBLAS ({library})"
    return f"the mlx[cpu] wheel's reference BLAS (slow prefill; {INSTALL_HINT})"


def use_openblas() -> None:
    """Re-execute this command with OpenBLAS preloaded (Linux, when installed and not yet done)."""
    if sys.platform != "linux" or os.environ.get(MARK):
        return
    library = openblas_path()
    if library is None:
        _note_once()
        return
    preload = os.environ.get("LD_PRELOAD", "")
    if library in preload.split(":"):
        return
    if "-c" in sys.orig_argv[1:2]:  # python -c: the code cannot be re-run from the command line
        return
    env = dict(os.environ, LD_PRELOAD=":".join(p for p in (library, preload) if p), **{MARK: library})
    # the same command line: `ifprune ...` (a script) or `python -m ifprune_mlx.cli ...`
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)


def _note_once() -> None:
    from .disk_cache import cache_dir

    stamp = cache_dir() / "openblas-note"
    if stamp.exists():
        return
    print(f"note: OpenBLAS is not installed, so MLX's CPU backend prefills slowly; {INSTALL_HINT} "
          "makes it several times faster (this note is shown once)", file=sys.stderr)
    try:
        stamp.parent.mkdir(parents=True, exist_ok=True)
        stamp.touch()
    except OSError:
        pass


def _preloaded() -> str | None:
    """The OpenBLAS library this process's MLX uses (preloaded), if any."""
    if sys.platform != "linux":
        return None
    return next((p for p in os.environ.get("LD_PRELOAD", "").split(":") if p and "blas" in p), None)


def set_threads(n: int) -> int | None:
    """Let OpenBLAS use `n` threads from now on; returns how many it used before (None: no
    OpenBLAS in this process, nothing changed)."""
    if n < 1:
        raise ValueError(f"BLAS threads must be at least 1, got {n}")
    library = _preloaded()
    if library is None:
        return None
    try:
        blas = ctypes.CDLL(library)  # the loaded library: dlopen returns the preloaded instance
        before = blas.openblas_get_num_threads()
        blas.openblas_set_num_threads(n)
    except (OSError, AttributeError):  # a BLAS without OpenBLAS's thread control
        return None
    return before


def serving_threads(requested: int | None = None) -> int:
    """BLAS threads for a server: `requested` if given, else one core fewer than the machine
    has (at least one)."""
    return requested or max(1, (os.cpu_count() or 1) - 1)
