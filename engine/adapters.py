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

On a sharded model (engine/sharding.py) the adapter file holds full factors, checked against
the full layer sizes, and each rank keeps the part that matches its slice of the layer: an
all-to-sharded layer (its output split) keeps its columns of `lora_b` (and of DoRA's `m`); a
sharded-to-all layer (its input split) keeps its rows of `lora_a`, and the low-rank partial
product `scale * (x_r @ A_r) @ B` is added to the layer's partial output *before* the layer's
own `all_sum`, so the sum over ranks is `x @ W.T + scale * (x @ A) @ B` with no collective of
its own. DoRA on a sharded-to-all layer is refused (its row norms span the shards).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Optional, Union

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from . import sharding
from .adapter_files import AdapterError, AdapterFiles, LinearSpec, read_adapter

__all__ = ["AdapterError", "AdapterManager", "PreparedAdapter", "AdaptedLinear"]


class _Weights:
    """One layer's adapter tensors; a plain object so they are not model parameters."""

    __slots__ = ("lora_a", "lora_b", "scale", "factor")

    def __init__(self, lora_a, lora_b, scale, factor=None):
        self.lora_a, self.lora_b, self.scale, self.factor = lora_a, lora_b, scale, factor


# The linear layers an adapter can target: mlx's plain and quantized ones and the sharded
# layers `shard_linear` makes of them.
LINEAR_TYPES = (nn.Linear, nn.QuantizedLinear, nn.AllToShardedLinear, nn.ShardedToAllLinear,
                nn.QuantizedAllToShardedLinear, nn.QuantizedShardedToAllLinear)
SHARDED_TO_ALL = (nn.ShardedToAllLinear, nn.QuantizedShardedToAllLinear)


def _quantized(layer: nn.Module) -> bool:
    return "scales" in layer


def _matmul_no_bias(layer: nn.Module, x: mx.array) -> mx.array:
    if _quantized(layer):
        return mx.quantized_matmul(
            x, layer["weight"], scales=layer["scales"], biases=layer.get("biases"),
            transpose=True, group_size=layer.group_size, bits=layer.bits,
            mode=getattr(layer, "mode", "affine"),
        )
    return x @ layer["weight"].T


def _dense_weight(layer: nn.Module) -> mx.array:
    if _quantized(layer):
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
        if isinstance(self.base, SHARDED_TO_ALL):  # this rank's partial sum, then the layer's
            y = _matmul_no_bias(self.base, x)
            z = (x @ w.lora_a) @ w.lora_b
            y = mx.distributed.all_sum(y + (w.scale * z).astype(x.dtype), group=self.base.group)
            return y + self.base["bias"] if "bias" in self.base else y
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
    plan_id: Optional[int] = None  # a sharded engine's name for it on the other ranks

    @property
    def num_layers(self) -> int:
        return len(self.layers)


@dataclass
class _Slot:
    parent: Union[nn.Module, list]
    key: Union[str, int]
    base: nn.Module
    wrapper: AdaptedLinear
    # On a sharded model, how this rank's part of each factor is cut (None: kept whole).
    split_a: Optional[sharding.Split] = None
    split_b: Optional[sharding.Split] = None


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
            if layer is not None:  # (a pipeline stage holds None for other stages' layers)
                inside.update(id(m) for m in layer.modules())
        self._slots: dict[str, _Slot] = {}
        self.layer_specs: dict[str, LinearSpec] = {}  # full sizes, also on a sharded model
        self.plan = sharding.plan_of(model)
        for name, module in model.named_modules():
            if id(module) not in inside or not isinstance(module, LINEAR_TYPES):
                continue
            packed = 32 // module.bits if _quantized(module) else 1
            shape = tuple(module["weight"].shape)
            split = self.plan.splits.get(name + ".weight") if self.plan is not None else None
            out_dims, in_dims = split.full_shape if split is not None else shape
            parent, key = _resolve(model, name)
            slot = _Slot(parent, key, module, AdaptedLinear(module))
            if split is not None and split.axis == 0:  # output split: lora_b's columns, m
                slot.split_b = sharding.factor_split(split, 1)
            elif split is not None:  # input split: lora_a's rows
                slot.split_a = sharding.factor_split(split, 0, packed)
            self._slots[name] = slot
            self.layer_specs[name] = LinearSpec(int(in_dims * packed), int(out_dims))
        self._active: set[str] = set()
        self.current = PreparedAdapter(None, "none", 0)

    def read(self, path: str) -> AdapterFiles:
        """Read and validate (numpy only; safe to call from another thread)."""
        if self.plan is not None and self.plan.pipelined:
            raise AdapterError(sharding.PIPELINED)
        return read_adapter(path, self.layer_specs)

    def prepare(self, source: Union[str, AdapterFiles, None]) -> PreparedAdapter:
        """MLX arrays for a validated adapter (engine thread). None means the base model."""
        t0 = time.perf_counter()
        if source is None:
            return PreparedAdapter(None, "none", 0)
        if self.plan is not None and self.plan.pipelined:
            raise AdapterError(sharding.PIPELINED)
        files = self.read(source) if isinstance(source, str) else source
        layers: dict[str, _Weights] = {}
        for name, mw in files.modules.items():
            slot = self._slots[name]
            if files.fine_tune_type == "dora" and slot.split_a is not None:
                raise AdapterError(f"layer {name!r}: DoRA on a layer whose input is split over "
                                   f"the ranks is not supported (its row norms span the "
                                   f"shards); use LoRA, or DoRA on other layers")
            a = _to_mx(_part(mw.lora_a, slot.split_a, self.plan), files.dtypes[name + ".lora_a"])
            b = _to_mx(_part(mw.lora_b, slot.split_b, self.plan), files.dtypes[name + ".lora_b"])
            factor = None
            if files.fine_tune_type == "dora":
                m_split = None if slot.split_b is None else sharding.Split(0, slot.split_b.segments, ())
                m = _to_mx(_part(mw.m, m_split, self.plan), files.dtypes[name + ".m"])
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


def _part(arr: np.ndarray, split: Optional[sharding.Split], plan) -> np.ndarray:
    """This rank's part of a full factor (the factor itself on one rank)."""
    return arr if split is None else sharding.take(arr, split, plan.rank, plan.size)


def _to_mx(arr: np.ndarray, dtype: str) -> mx.array:
    if dtype == "bfloat16":
        return mx.array(arr).view(mx.bfloat16)  # arr holds the raw bits as uint16
    return mx.array(arr)
