#!/usr/bin/env python3
"""Which BLAS MLX's CPU backend really uses: a 1024x1024 float32 matmul timed in a fresh
process (as the engine is one) with nothing preloaded, then with each library given preloaded
(LD_PRELOAD, as `mlxsup.blas.engine_env` does for the engine), and whether it was mapped.

    python scripts/bench_blas.py                                   # the reference BLAS and find_blas()'s pick
    python scripts/bench_blas.py /path/to/libscipy_openblas.so     # any other candidate

A library that is mapped but leaves GFLOP/s where the reference BLAS is does not interpose
MLX's `cblas_sgemm` (pip's scipy-openblas wheels export `scipy_cblas_sgemm` instead).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

CHECK = r"""
import json, sys, time
import mlx.core as mx
mx.set_default_device(mx.cpu)
a = mx.random.normal((1024, 1024)); b = mx.random.normal((1024, 1024)); mx.eval(a, b)
for _ in range(3): mx.eval(a @ b)
n = 10; t = time.perf_counter()
for _ in range(n): mx.eval(a @ b)
dt = (time.perf_counter() - t) / n
lib = sys.argv[1]
mapped = bool(lib) and lib in open("/proc/self/maps").read()
print(json.dumps({"gflops": round(2 * 1024 ** 3 / dt / 1e9, 1), "mapped": mapped}))
"""


def measure(lib: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "MLXSUP_BLAS_LIB")}
    if lib:
        env["LD_PRELOAD"] = lib
        env.setdefault("OPENBLAS_NUM_THREADS", str(os.cpu_count() or 1))
    out = subprocess.run([sys.executable, "-c", CHECK, os.path.realpath(lib) if lib else ""], env=env,
                         capture_output=True, text=True, timeout=300, check=True)
    return json.loads(out.stdout)


def main(argv=None) -> int:
    from mlxsup.blas import find_blas

    libs = [""] + (list(argv if argv is not None else sys.argv[1:]) or [find_blas() or ""])
    for lib in dict.fromkeys(libs):
        r = measure(lib)
        print(f"{lib or 'reference BLAS (nothing preloaded)'}: {r['gflops']} GFLOP/s"
              + ("" if not lib else f", mapped: {r['mapped']}"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
