"""An optimized BLAS for the engine process on Linux.

`mlx[cpu]` on Linux links the reference BLAS, about 30x slower at matrix products than
OpenBLAS (Debian's `libopenblas0-pthread`) preloaded in its place (docs/engine.md, "BLAS").
The supervisor builds the engine's environment with `engine_env` so users get the fast path
without doing anything, and `mlxsup start` warns (`blas_warning`) when there is none to
preload; `--blas off` or `MLXSUP_BLAS=off` opts out of both.

Only libraries exporting the standard `cblas_*` names can take the reference BLAS's place:
pip's scipy-openblas wheels prefix theirs (`scipy_cblas_sgemm`), so preloading them maps the
library and changes nothing (measured: docs/engine.md); they are not looked for.
"""

from __future__ import annotations

import importlib.metadata
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
    return None


def _opted_out(mode: str, env: Mapping[str, str]) -> bool:
    return mode == "off" or env.get("MLXSUP_BLAS", "").lower() == "off" or not sys.platform.startswith("linux")


def has_cuda_backend() -> bool:
    """Whether MLX's CUDA backend is installed (`mlx[cuda]`: an `mlx-cuda*` distribution);
    the model then runs on the GPU and the CPU's BLAS hardly matters."""
    for dist in importlib.metadata.distributions():
        name = (dist.metadata["Name"] or "").lower().replace("_", "-")
        if name.startswith("mlx-cuda"):
            return True
    return False


def blas_warning(mode: str = "auto", env: Mapping[str, str] = os.environ) -> Optional[str]:
    """What `mlxsup start` warns on Linux when the engine would multiply matrices with the
    reference BLAS: none found to preload, none preloaded by the user, no CUDA backend, not
    opted out. None otherwise."""
    if _opted_out(mode, env) or find_blas() is not None or "blas" in env.get("LD_PRELOAD", "").lower():
        return None
    if has_cuda_backend():
        return None
    return ("WARNING: no optimized BLAS found: the engine's CPU matrix products run on the reference BLAS "
            "that mlx[cpu] ships, about 30x slower.\n"
            "WARNING:   install OpenBLAS (Debian/Ubuntu: apt-get install libopenblas0-pthread; Fedora: dnf install "
            "openblas) and start again; --blas off (or MLXSUP_BLAS=off) silences this.")


def engine_env(base: Mapping[str, str], mode: str = "auto") -> dict[str, str]:
    """Environment for the engine process: `base` plus LD_PRELOAD of an optimized BLAS.

    Only on Linux (macOS uses Accelerate, CUDA builds their own BLAS); `mode` "off" or
    MLXSUP_BLAS=off in `base` leaves the environment as it is."""
    env = dict(base)
    if _opted_out(mode, env):
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
