"""LoRA and DoRA adapters on the live model, swapped by reference.

At start every linear layer inside the model's transformer blocks (`model.layers`), plain
or quantized, gets a wrapper module (`AdaptedLinear`) that is *not* installed. Preparing an
adapter turns the validated numpy tensors (`adapter_files.read_adapter`, which may run in
another thread) into MLX arrays on the engine thread, and precomputes DoRA's per-row factor
`m / ||W + scale * B^T A^T||`. Committing installs the wrappers of the layers the adapter
targets, points each at its tensors and puts the base layers back everywhere else: a few
dictionary assignments per layer, no compute, so a prepared swap commits in well under a
millisecond whatever the rank, and the base model runs with no wrapper at all.

The numerics follow mlx-lm's `LoRALinear` / `DoRALinear` (same operation order and dtypes),
so an adapter gives the logits mlx-lm's `load_adapters` gives.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Optional, Union

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .adapter_files import AdapterError, AdapterFiles, LinearSpec, read_adapter

__all__ = ["AdapterError", "AdapterManager", "PreparedAdapter", "AdaptedLinear"]


class _Weights:
    """One layer's adapter tensors; a plain object so they are not model parameters."""

    __slots__ = ("lora_a", "lora_b", "scale", "factor")

    def __init__(self, lora_a, lora_b, scale, factor=None):
        self.lora_a, self.lora_b, self.scale, self.factor = lora_a, lora_b, scale, factor


def _matmul_no_bias(layer: nn.Module, x: mx.array) -> mx.array:
    if isinstance(layer, nn.QuantizedLinear):
        return mx.quantized_matmul(
            x, layer["weight"], scales=layer["scales"], biases=layer.get("biases"),
            transpose=True, group_size=layer.group_size, bits=layer.bits,
            mode=getattr(layer, "mode", "affine"),
        )
    return x @ layer["weight"].T


def _dense_weight(layer: nn.Module) -> mx.array:
    if isinstance(layer, nn.QuantizedLinear):
        return mx.dequantize(
            layer["weight"], layer["scales"], layer.get("biases"), group_size=layer.group_size,
            bits=layer.bits, mode=getattr(layer, "mode", "affine"),
        )
    return layer["weight"]


class AdaptedLinear(nn.Module):
    """A linear layer plus a low-rank update: `y = base(x) + scale * (x @ A) @ B`, or for
    DoRA `y = f * (x @ W.T + scale * (x @ A) @ B) + bias` with `f` precomputed."""

    def __init__(self, base: nn.Module):
        super().__init__()
        self.base = base
        self.weights: Optional[_Weights] = None

    def __call__(self, x: mx.array) -> mx.array:
        w = self.weights
        if w.factor is None:
            y = self.base(x)
            z = (x @ w.lora_a) @ w.lora_b
            return y + (w.scale * z).astype(x.dtype)
        y = _matmul_no_bias(self.base, x)
        z = (x @ w.lora_a) @ w.lora_b
        out = w.factor.astype(x.dtype) * (y + (w.scale * z).astype(x.dtype))
        if "bias" in self.base:
            out = out + self.base["bias"]
        return out


@dataclass
class PreparedAdapter:
    """An adapter ready to commit (MLX arrays evaluated), or the base model (path None)."""

    path: Optional[str]
    fine_tune_type: str  # "lora", "dora" or "none"
    rank: int
    layers: dict[str, _Weights] = field(default_factory=dict)
    prepare_ms: float = 0.0
    nbytes: int = 0

    @property
    def num_layers(self) -> int:
        return len(self.layers)


@dataclass
class _Slot:
    parent: Union[nn.Module, list]
    key: Union[str, int]
    base: nn.Module
    wrapper: AdaptedLinear


def _resolve(model: nn.Module, path: str):
    obj = model
    parts = path.split(".")
    for part in parts[:-1]:
        obj = obj[int(part)] if isinstance(obj, list) else obj[part]
    key = parts[-1]
    return obj, (int(key) if isinstance(obj, list) else key)


class AdapterManager:
    """Owns the wrappers and which adapter the model runs with."""

    def __init__(self, model: nn.Module):
        self.model = model
        inside = set()
        for layer in getattr(model, "layers", []):
            inside.update(id(m) for m in layer.modules())
        self._slots: dict[str, _Slot] = {}
        self.layer_specs: dict[str, LinearSpec] = {}
        for name, module in model.named_modules():
            if id(module) not in inside or not isinstance(module, (nn.Linear, nn.QuantizedLinear)):
                continue
            out_dims, in_dims = module["weight"].shape
            if isinstance(module, nn.QuantizedLinear):
                in_dims = in_dims * 32 // module.bits
            parent, key = _resolve(model, name)
            self._slots[name] = _Slot(parent, key, module, AdaptedLinear(module))
            self.layer_specs[name] = LinearSpec(int(in_dims), int(out_dims))
        self._active: set[str] = set()
        self.current = PreparedAdapter(None, "none", 0)

    def read(self, path: str) -> AdapterFiles:
        """Read and validate (numpy only; safe to call from another thread)."""
        return read_adapter(path, self.layer_specs)

    def prepare(self, source: Union[str, AdapterFiles, None]) -> PreparedAdapter:
        """MLX arrays for a validated adapter (engine thread). None means the base model."""
        t0 = time.perf_counter()
        if source is None:
            return PreparedAdapter(None, "none", 0)
        files = self.read(source) if isinstance(source, str) else source
        layers: dict[str, _Weights] = {}
        for name, mw in files.modules.items():
            a = _to_mx(mw.lora_a, files.dtypes[name + ".lora_a"])
            b = _to_mx(mw.lora_b, files.dtypes[name + ".lora_b"])
            factor = None
            if files.fine_tune_type == "dora":
                m = _to_mx(mw.m, files.dtypes[name + ".m"])
                w = _dense_weight(self._slots[name].base)
                adapted = w + (files.scale * b.T) @ a.T
                factor = (m / mx.linalg.norm(adapted, axis=1)).astype(w.dtype)
            layers[name] = _Weights(a, b, files.scale, factor)
        arrays = [x for w in layers.values() for x in (w.lora_a, w.lora_b, w.factor)
                  if x is not None]
        mx.eval(arrays)
        return PreparedAdapter(
            path=files.path, fine_tune_type=files.fine_tune_type, rank=files.rank,
            layers=layers, prepare_ms=(time.perf_counter() - t0) * 1e3,
            nbytes=sum(x.nbytes for x in arrays),
        )

    def commit(self, prepared: PreparedAdapter) -> None:
        """Run the model with `prepared` from now on (call between steps)."""
        for name in self._active - prepared.layers.keys():
            slot = self._slots[name]
            slot.parent[slot.key] = slot.base
            slot.wrapper.weights = None
        for name, weights in prepared.layers.items():
            slot = self._slots[name]
            slot.wrapper.weights = weights
            if name not in self._active:
                slot.parent[slot.key] = slot.wrapper
        self._active = set(prepared.layers)
        self.current = prepared


def _to_mx(arr: np.ndarray, dtype: str) -> mx.array:
    if dtype == "bfloat16":
        return mx.array(arr).view(mx.bfloat16)  # arr holds the raw bits as uint16
    return mx.array(arr)
