"""Shared fixtures: tiny generated models built once per test session."""

from __future__ import annotations

import os

import pytest


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> str:
    """A ~100k-parameter random Llama with a real BPE tokenizer, mlx-lm/HF layout."""
    from mlxsup.demo import build_demo_model

    return build_demo_model(str(tmp_path_factory.mktemp("tiny-model")), seed=0, preset="tiny")


@pytest.fixture(scope="session")
def demo_model_dir(tmp_path_factory) -> str:
    """The default demo model (~2.7M parameters)."""
    from mlxsup.demo import build_demo_model

    return build_demo_model(str(tmp_path_factory.mktemp("demo-model")), seed=0, preset="demo")


def shm_segments(prefix: str = "mxs_") -> set[str]:
    """Names of this project's shared-memory segments currently in /dev/shm (Linux)."""
    try:
        return {n for n in os.listdir("/dev/shm") if n.startswith(prefix)}
    except FileNotFoundError:
        return set()
