"""An optimized BLAS for the engine process on Linux.

`mlx[cpu]` on Linux links the reference BLAS, which ran a 1024x1024 float32 matmul at about
8 GFLOP/s on the development machine; preloading OpenBLAS (Debian's `libopenblas0-pthread`)
gave about 250 GFLOP/s. The supervisor builds the engine's environment with `engine_env` so
users get the fast path without doing anything; `--blas off` or `MLXSUP_BLAS=off` opts out.
"""

from __future__ import annotations

import glob
import os
import sys
from typing import Mapping, Optional

# Pthread builds first: the OpenMP build clashes with other OpenMP runtimes in one process.
CANDIDATES = (
    "/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib64/libopenblasp.so.0",
    "/usr/lib64/libopenblas.so.0",
    "/usr/lib/libopenblas.so.0",
    "/usr/lib/x86_64-linux-gnu/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/libopenblas.so.0",
)


def find_blas(candidates=CANDIDATES) -> Optional[str]:
    """Path of an optimized BLAS shared library on this machine, or None."""
    for path in candidates:
        if os.path.exists(path):
            return path
    # pip's scipy-openblas wheels ship one too.
    for site in sys.path:
        hits = sorted(glob.glob(os.path.join(site, "scipy_openblas*", "lib", "libscipy_openblas*.so")))
        if hits:
            return hits[0]
    return None


def engine_env(base: Mapping[str, str], mode: str = "auto") -> dict[str, str]:
    """Environment for the engine process: `base` plus LD_PRELOAD of an optimized BLAS.

    Only on Linux (macOS uses Accelerate, CUDA builds their own BLAS); `mode` "off" or
    MLXSUP_BLAS=off in `base` leaves the environment as it is."""
    env = dict(base)
    if mode == "off" or env.get("MLXSUP_BLAS", "").lower() == "off" or not sys.platform.startswith("linux"):
        return env
    lib = find_blas()
    if lib is None:
        return env
    preload = [p for p in env.get("LD_PRELOAD", "").split(":") if p]
    if lib not in preload:
        env["LD_PRELOAD"] = ":".join([lib] + preload)
    # Two BLAS thread pools would fight MLX's own threads for the cores.
    env.setdefault("OPENBLAS_NUM_THREADS", str(os.cpu_count() or 1))
    env["MLXSUP_BLAS_LIB"] = lib
    return env


def reexec_with_blas(mode: str = "auto") -> None:
    """For benchmark scripts that run MLX in their own process: re-execute this process with
    `engine_env`'s environment when that adds an optimized BLAS (as the supervisor does for
    the engine); return otherwise (already preloaded, none found, `mode` "off", MLXSUP_BLAS=off,
    not Linux)."""
    if mode == "off" or os.environ.get("MLXSUP_BLAS_LIB"):
        return
    env = engine_env(os.environ, mode)
    if env.get("MLXSUP_BLAS_LIB"):  # the interpreter's own command line (-c, -m included)
        os.execve(sys.executable, [sys.executable] + sys.orig_argv[1:], env)
