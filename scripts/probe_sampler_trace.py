"""How long the compiled sampler's first call at a new batch size or mix takes (the trace, and
on CUDA the JIT of its kernels), against a repeat call and the op-by-op sampler. A diagnostic
for slow engine steps on a GPU: `python3 scripts/probe_sampler_trace.py [VOCAB] [--warm]`
(`--warm`: build the engine's start-up samplers first, and time that)."""

import atexit
import os
import shutil
import sys
import tempfile
import time

import mlx.core as mx

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from bench_lib.systems import mlxsup_import_env  # noqa: E402

_shim = tempfile.mkdtemp(prefix="probe-sampler-")
atexit.register(shutil.rmtree, _shim, True)
mlxsup_import_env(os.path.dirname(HERE), _shim)
from mlxsup.engine import sampling  # noqa: E402
from mlxsup.ipc.messages import SamplingParams  # noqa: E402

VOCAB = int(sys.argv[1]) if len(sys.argv) > 1 and sys.argv[1].isdigit() else 25000


def run(b, greedy_rows=0, compiled=True):
    sampling.COMPILE = compiled
    params = [SamplingParams(temperature=0.0 if i < greedy_rows else 1.0) for i in range(b)]
    rows = sampling.RowParams.build(params, VOCAB)
    logits = mx.random.normal((b, VOCAB)).astype(mx.bfloat16)
    keys = sampling.keys_for(list(range(b)))
    mx.eval(logits, keys, *rows.arrays())
    t0 = time.perf_counter()
    out = sampling.sample(logits, rows, keys, None)
    mx.eval(*[o for o in out if o is not None])
    return (time.perf_counter() - t0) * 1e3


print(mx.__version__, mx.default_device())
if "--warm" in sys.argv:
    t0 = time.perf_counter()
    sampling.COMPILE = True
    n = sampling.warm_up(mx.random.normal((1, VOCAB)).astype(mx.bfloat16))
    print(f"warm_up: {n} traces, {(time.perf_counter() - t0) * 1e3:.0f} ms", flush=True)
for b, g in [(1, 0), (1, 0), (2, 0), (3, 0), (8, 0), (9, 1), (9, 1), (111, 0), (111, 0), (112, 0),
             (113, 1), (200, 0), (200, 200)]:
    t_c = run(b, g, True)
    t_o = run(b, g, False)
    print(f"B={b:4d} greedy rows {g}: compiled {t_c:9.1f} ms, op by op {t_o:7.1f} ms, "
          f"traces so far {sampling.traces}, samplers {len(sampling._compiled)}", flush=True)
