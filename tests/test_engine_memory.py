"""The engine gives freed heap pages back when it goes idle (engine/memory.py)."""

import subprocess
import sys
import textwrap

import pytest

from mlxsup.engine.memory import HeapTrimmer

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc_trim")

PROBE = textwrap.dedent("""
    import ctypes, psutil
    from mlxsup.engine.memory import HeapTrimmer
    libc = ctypes.CDLL(None)
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = [ctypes.c_void_p]
    rss = lambda: psutil.Process().memory_info().rss
    # 64 MiB in 4 KiB chunks (below any mmap threshold: heap pages), touched, then freed
    # while one chunk allocated after them pins the top of the heap.
    chunks = [libc.malloc(4096) for _ in range(16384)]
    for c in chunks:
        ctypes.memset(c, 1, 4096)
    pin = libc.malloc(4096)
    for c in chunks:
        libc.free(c)
    before = rss()
    t = HeapTrimmer(min_interval_s=3600)
    first, second = t.trim(), t.trim()
    print(before - rss(), first, second)
""")


@linux_only
def test_trim_returns_freed_heap_pages_and_is_rate_limited():
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True,
                         timeout=60, check=True).stdout.split()
    released, first, second = int(out[0]), out[1], out[2]
    assert released > 32 * 2**20  # most of the 64 MiB left the resident set
    assert (first, second) == ("True", "False")  # the second call came too soon


def test_trim_without_malloc_trim_is_a_no_op(monkeypatch):
    t = HeapTrimmer()
    t._fn = None
    assert not t.trim() and t.num_trims == 0


@linux_only
def test_engine_trims_when_it_goes_idle(tiny_model_dir):
    from mlxsup.engine.config import EngineConfig
    from mlxsup.engine.core import Engine
    from mlxsup.ipc.messages import SamplingParams

    eng = Engine(EngineConfig(model=tiny_model_dir, max_batch=4))
    eng.generate([[1, 2, 3]] * 2, SamplingParams(max_tokens=4))
    assert eng._trimmer.num_trims == 1
    eng.generate([[1, 2, 3]], SamplingParams(max_tokens=4))  # idle again within a second
    assert eng._trimmer.num_trims == 1
