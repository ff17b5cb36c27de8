"""Read and validate an adapter directory in mlx-lm's format, with numpy only.

`adapter_config.json` + `adapters.safetensors`, LoRA or DoRA. This module never imports mlx,
so the engine process runs it in a background thread while the model keeps generating. The
safetensors header parser is mlxsup.safetensors_header (shared with the API's upload check);
nothing is unpickled. Every tensor's name, dtype, shape, byte range and
values are checked against the model's layer table, and the first offending tensor (in file
order) is named in one `AdapterError`.
"""

from __future__ import annotations

import io
import json
import math
import os
from dataclasses import dataclass, field
from typing import Mapping, Optional

import numpy as np

from mlxsup.files import directory_problem
from mlxsup.safetensors_header import CONFIG_NAME, WEIGHTS_NAME, HeaderError, read_header

LEAVES = ("lora_a", "lora_b", "m")

# safetensors dtype -> (numpy dtype of the stored bytes, bytes per element)
_DTYPES = {"F32": ("<f4", 4), "F16": ("<f2", 2), "BF16": ("<u2", 2)}


class AdapterError(Exception):
    """An adapter that cannot be used; the message says why. `kind` is "not_found" when
    the path does not exist (HTTP 404), else "invalid" (HTTP 422)."""

    def __init__(self, message: str, kind: str = "invalid"):
        super().__init__(message)
        self.kind = kind


@dataclass(frozen=True)
class LinearSpec:
    """A linear layer an adapter may target: y = x @ W.T with W of (output_dims, input_dims)."""

    input_dims: int
    output_dims: int


@dataclass
class ModuleWeights:
    lora_a: np.ndarray  # (input_dims, rank)
    lora_b: np.ndarray  # (rank, output_dims)
    m: Optional[np.ndarray] = None  # (output_dims,), DoRA's magnitude


@dataclass
class AdapterFiles:
    """A validated adapter, still as numpy arrays. `dtype` is the stored dtype name
    ("float32", "float16" or "bfloat16"; bfloat16 arrays hold the raw uint16 bits)."""

    path: str
    fine_tune_type: str  # "lora" or "dora"
    rank: int
    scale: float
    modules: dict[str, ModuleWeights] = field(default_factory=dict)
    dtypes: dict[str, str] = field(default_factory=dict)  # tensor name -> dtype name
    nbytes: int = 0


def _fail(msg: str) -> None:
    raise AdapterError(msg)


def _read_config(path: str) -> tuple[str, int, float]:
    cfg_path = os.path.join(path, CONFIG_NAME)
    if not os.path.isfile(cfg_path):
        _fail(f"{CONFIG_NAME} is missing in {path}")
    try:
        with open(cfg_path, "rb") as f:
            cfg = json.loads(f.read())
    except (OSError, ValueError) as e:
        _fail(f"{CONFIG_NAME} is not valid JSON: {e}")
    if not isinstance(cfg, dict):
        _fail(f"{CONFIG_NAME} must hold a JSON object")
    ftype = cfg.get("fine_tune_type", "dora" if cfg.get("use_dora") is True else "lora")
    if ftype == "full":
        _fail(f"{CONFIG_NAME}: fine_tune_type 'full' holds full weights, not an adapter")
    if ftype not in ("lora", "dora"):
        _fail(f"{CONFIG_NAME}: fine_tune_type must be 'lora' or 'dora', not {ftype!r}")
    params = cfg.get("lora_parameters")
    if not isinstance(params, dict):
        _fail(f"{CONFIG_NAME}: lora_parameters (an object with rank and scale) is missing")
    rank = params.get("rank")
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        _fail(f"{CONFIG_NAME}: lora_parameters.rank must be a positive integer, not {rank!r}")
    scale = params.get("scale")
    if scale is None:
        hint = " (mlx-lm uses 'scale', not 'alpha')" if "alpha" in params else ""
        _fail(f"{CONFIG_NAME}: lora_parameters.scale is missing{hint}")
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        _fail(f"{CONFIG_NAME}: lora_parameters.scale must be a finite number, not {scale!r}")
    return ftype, rank, float(scale)


def _to_float32(arr: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "BF16":
        return (arr.astype(np.uint32) << 16).view(np.float32)
    return arr.astype(np.float32, copy=False)


def read_adapter(path: str, layers: Mapping[str, LinearSpec]) -> AdapterFiles:
    """Read and validate the adapter at `path` against `layers` (the model's adaptable
    linear layers by module path). Raises AdapterError naming the first problem."""
    problem = directory_problem(path)
    if problem is not None:
        raise AdapterError(problem[1], kind="not_found" if problem[0] == "not_found" else "invalid")
    ftype, rank, scale = _read_config(path)
    weights_path = os.path.join(path, WEIGHTS_NAME)
    if not os.path.isfile(weights_path):
        _fail(f"{WEIGHTS_NAME} is missing in {path}")
    with open(weights_path, "rb") as f:
        data = f.read()
    try:
        entries, data_start = read_header(io.BytesIO(data), len(data))
    except HeaderError as e:
        _fail(f"{WEIGHTS_NAME} {e}")

    out = AdapterFiles(path=path, fine_tune_type=ftype, rank=rank, scale=scale)
    found: dict[str, dict[str, np.ndarray]] = {}
    for tname, dtype, shape, begin, end in entries:
        module, _, leaf = tname.rpartition(".")
        if leaf not in LEAVES or not module:
            _fail(f"tensor {tname!r}: not an adapter parameter (expected "
                  f"<layer>.lora_a, <layer>.lora_b or <layer>.m)")
        spec = layers.get(module)
        if spec is None:
            _fail(f"tensor {tname!r}: the model has no adaptable linear layer {module!r}")
        if leaf == "m" and ftype != "dora":
            _fail(f"tensor {tname!r}: a DoRA magnitude in an adapter whose "
                  f"fine_tune_type is {ftype!r}")
        if dtype not in _DTYPES:
            _fail(f"tensor {tname!r}: dtype {dtype!r} is not supported "
                  f"(use float32, float16 or bfloat16)")
        expected = {
            "lora_a": (spec.input_dims, rank),
            "lora_b": (rank, spec.output_dims),
            "m": (spec.output_dims,),
        }[leaf]
        if shape != expected:
            _fail(f"tensor {tname!r}: shape {shape} does not match the model, which needs "
                  f"{expected} (layer {spec.output_dims}x{spec.input_dims}, rank {rank} "
                  f"from {CONFIG_NAME})")
        np_dtype, itemsize = _DTYPES[dtype]
        if end - begin != math.prod(shape) * itemsize:
            _fail(f"tensor {tname!r}: {end - begin} bytes of data for shape {shape} {dtype}")
        arr = np.frombuffer(data, dtype=np_dtype, count=math.prod(shape),
                            offset=data_start + begin).reshape(shape)
        if not np.isfinite(_to_float32(arr, dtype)).all():
            _fail(f"tensor {tname!r}: holds NaN or infinite values")
        if leaf in found.get(module, {}):
            _fail(f"tensor {tname!r}: appears twice")
        found.setdefault(module, {})[leaf] = arr.copy()
        out.dtypes[tname] = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}[dtype]
        out.nbytes += end - begin

    for module, leaves in found.items():  # in file order
        needed = ("lora_a", "lora_b", "m") if ftype == "dora" else ("lora_a", "lora_b")
        for leaf in needed:
            if leaf not in leaves:
                _fail(f"tensor {module + '.' + leaf!r} is missing: layer {module!r} has "
                      f"{', '.join(sorted(leaves))} but a {ftype} adapter needs {', '.join(needed)}")
        out.modules[module] = ModuleWeights(leaves["lora_a"], leaves["lora_b"], leaves.get("m"))
    return out

