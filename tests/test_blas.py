"""The engine's BLAS environment: found on Linux, opt-out works, and results stay right."""

import json
import os
import subprocess
import sys

import pytest

from mlxsup.blas import engine_env, find_blas

CHECK = r"""
import json, os
import numpy as np
import mlx.core as mx
rng = np.random.default_rng(0)
a = rng.standard_normal((512, 384), dtype=np.float32)
b = rng.standard_normal((384, 256), dtype=np.float32)
got = np.array(mx.matmul(mx.array(a), mx.array(b)))
ref = a.astype(np.float64) @ b.astype(np.float64)
maps = open("/proc/self/maps").read() if os.path.exists("/proc/self/maps") else ""
print(json.dumps({"err": float(np.max(np.abs(got - ref))), "openblas": "openblas" in maps}))
"""


def _run(env):
    out = subprocess.run([sys.executable, "-c", CHECK], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_matmul_matches_numpy_without_preload():
    env = engine_env(os.environ, mode="off")
    env.pop("LD_PRELOAD", None)
    result = _run(env)
    assert result["err"] < 1e-3


@pytest.mark.skipif(not sys.platform.startswith("linux") or find_blas() is None,
                    reason="no optimized BLAS on this machine")
def test_matmul_matches_numpy_with_preload():
    env = engine_env(os.environ)
    assert find_blas() in env["LD_PRELOAD"].split(":")
    result = _run(env)
    assert result["openblas"], "the preloaded OpenBLAS was not mapped into the process"
    assert result["err"] < 1e-3


def test_opt_out_leaves_environment_alone():
    base = {"PATH": "/usr/bin"}
    assert engine_env(base, mode="off") == base
    assert engine_env({**base, "MLXSUP_BLAS": "off"}) == {**base, "MLXSUP_BLAS": "off"}


def test_existing_preload_is_kept(monkeypatch):
    monkeypatch.setattr("mlxsup.blas.find_blas", lambda: "/opt/libfast.so")
    monkeypatch.setattr(sys, "platform", "linux")
    env = engine_env({"LD_PRELOAD": "/opt/other.so"})
    assert env["LD_PRELOAD"] == "/opt/libfast.so:/opt/other.so"
    assert engine_env(env)["LD_PRELOAD"] == env["LD_PRELOAD"]


_REEXEC = """
import os, sys
from mlxsup.blas import reexec_with_blas
reexec_with_blas(sys.argv[1])
maps = open("/proc/self/maps").read() if os.path.exists("/proc/self/maps") else ""
print(os.environ.get("MLXSUP_BLAS_LIB") or "-", "openblas" in maps.lower(), sys.argv[1:])
"""


@pytest.mark.skipif(not sys.platform.startswith("linux") or find_blas() is None,
                    reason="no optimized BLAS on this machine")
def test_scripts_reexec_themselves_with_the_blas_once():
    env = {k: v for k, v in os.environ.items() if k not in ("MLXSUP_BLAS_LIB", "LD_PRELOAD")}
    run = lambda mode: subprocess.run(  # noqa: E731
        [sys.executable, "-c", _REEXEC, mode, "--flag"], env=env, capture_output=True, text=True,
        timeout=60, check=True).stdout.split()
    lib, mapped, *args = run("auto")
    assert lib == find_blas() and mapped == "True" and args == ["['auto',", "'--flag']"]
    lib, mapped, *_ = run("off")
    assert lib == "-"


def test_scipy_openblas_wheels_are_not_taken_for_an_optimized_blas():
    # Their symbols are prefixed (scipy_cblas_sgemm): preloaded, MLX still calls the reference
    # BLAS (docs/engine.md, "BLAS"). Even with one installed, only real candidates count.
    assert find_blas(candidates=()) is None
    assert find_blas(candidates=("/nonexistent/libopenblas.so.0", __file__)) == __file__


@pytest.fixture
def linux_cpu(monkeypatch):
    monkeypatch.setattr(sys, "platform", "linux")
    monkeypatch.setattr("mlxsup.blas.find_blas", lambda: None)
    monkeypatch.setattr("mlxsup.blas.has_cuda_backend", lambda: False)


def test_start_warns_with_the_fix_when_there_is_no_blas(linux_cpu, monkeypatch):
    from mlxsup.blas import blas_warning

    warning = blas_warning("auto", {})
    assert "30x slower" in warning and "apt-get install libopenblas0-pthread" in warning and "--blas off" in warning
    assert blas_warning("off", {}) is None and blas_warning("auto", {"MLXSUP_BLAS": "off"}) is None
    assert blas_warning("auto", {"LD_PRELOAD": "/opt/intel/libmkl_rt.so:/opt/libopenblas.so"}) is None
    monkeypatch.setattr("mlxsup.blas.find_blas", lambda: "/usr/lib/libopenblas.so.0")
    assert blas_warning("auto", {}) is None
    monkeypatch.setattr("mlxsup.blas.find_blas", lambda: None)
    monkeypatch.setattr("mlxsup.blas.has_cuda_backend", lambda: True)  # the model runs on the GPU
    assert blas_warning("auto", {}) is None
    monkeypatch.setattr(sys, "platform", "darwin")  # Accelerate
    monkeypatch.setattr("mlxsup.blas.has_cuda_backend", lambda: False)
    assert blas_warning("auto", {}) is None


def test_mlxsup_start_prints_and_logs_the_blas_warning(linux_cpu, monkeypatch, tmp_path, capsys):
    from mlxsup.config import ServerConfig
    from mlxsup.supervisor import launcher

    seen = {}

    def start_daemon(config, out, err, warning, options):  # what the daemon would log
        seen["warning"] = warning
        return 0

    monkeypatch.setattr(launcher, "check_port", lambda host, port: None)
    monkeypatch.setattr(launcher, "_start_daemon", start_daemon)
    config = ServerConfig(run_dir=str(tmp_path / "run"), host="127.0.0.1", port=1)
    assert launcher.start(config) == 0
    assert "apt-get install libopenblas0-pthread" in capsys.readouterr().err
    assert "apt-get install libopenblas0-pthread" in seen["warning"]  # what the daemon logs
    seen.clear()
    assert launcher.start(ServerConfig(run_dir=str(tmp_path / "run2"), host="127.0.0.1", port=1, blas="off")) == 0
    assert seen["warning"] is None and "BLAS" not in capsys.readouterr().err
