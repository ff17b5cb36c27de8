"""How a sharded model's parameters were split, so full tensors (a LoRA adapter's factors, a
weight update) can be split the same way on every rank.

mlx-lm's `model.shard(group)` splits parameters through MLX's `shard_linear` / `shard_inplace`,
and every one of those goes through one function, `mlx.nn.layers.distributed._shard`, which
asks a predicate for each parameter's split axis and segments (a fused QKV weight is split
per segment). Nothing keeps that answer: the sharded layer only holds its slice. So
`recording()` wraps `_shard` while the model is sharded and notes, for every array it returns,
the axis, the segments and the full shape; `attach()` then names them by parameter. That is a
private MLX function, so the wrapper is written to fail safe: if MLX stops calling it (or a
model slices a parameter by hand), nothing is recorded for that parameter, its full shape is
taken to be its local one, and a full tensor for it is refused as the wrong shape (on every
rank alike) instead of being split by a guess.

`take()` applies a split to a numpy (or MLX) array with the arithmetic of MLX's `_shard`
(split into segments, each segment into `size` equal parts, keep part `rank` of each,
concatenate); written here, not called from MLX, so a weight update is split on the memory
mapped numpy view and only this rank's slice is ever copied.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Optional, Union

import numpy as np

# The attribute of a sharded model that holds its ShardPlan (set by `attach`).
ATTR = "mlxsup_sharding"


@dataclass(frozen=True)
class Split:
    """One parameter's split: `axis` (non-negative), `segments` as MLX takes them (an int, a
    list of indices, or a list of fractions), and the full (unsplit) shape."""

    axis: int
    segments: Union[int, tuple]
    full_shape: tuple


@dataclass
class ShardPlan:
    rank: int
    size: int
    splits: dict = field(default_factory=dict)  # parameter name -> Split
    pipelined: bool = False  # the model's layers are split over the ranks (pipeline())

    def full_shape(self, name: str, local_shape: tuple) -> tuple:
        split = self.splits.get(name)
        return split.full_shape if split is not None else tuple(local_shape)

    def take(self, name: str, arr, xp=np):
        """This rank's part of the full tensor `arr` of parameter `name`."""
        split = self.splits.get(name)
        return arr if split is None else take(arr, split, self.rank, self.size, xp)


def _split(arr, segments, axis: int, xp):
    """MLX's `_split`: mx.split, with fractional segments turned into indices."""
    if isinstance(segments, int) or isinstance(segments[0], int):
        return xp.split(arr, segments if isinstance(segments, int) else list(segments), axis=axis)
    n = arr.shape[axis]
    return xp.split(arr, [int(s * n) for s in segments], axis=axis)


def take(arr, split: Split, rank: int, size: int, xp=np):
    """Part `rank` of `size` of `arr` along `split` (MLX's `_shard` arithmetic)."""
    parts = [_split(part, size, split.axis, xp)[rank]
             for part in _split(arr, split.segments, split.axis, xp)]
    out = parts[0] if len(parts) == 1 else xp.concatenate(parts, axis=split.axis)
    return np.ascontiguousarray(out) if xp is np else out


def factor_split(weight_split: Split, axis: int, packed: int = 1) -> Split:
    """The split of a LoRA factor (or DoRA magnitude) along its `axis`, given the split of the
    layer's weight along the matching axis. `packed`: elements per stored weight element (32 /
    bits for a quantized weight split along its input axis), so index segments are rescaled."""
    seg = weight_split.segments
    if packed != 1 and not isinstance(seg, int) and isinstance(seg[0], int):
        seg = tuple(s * packed for s in seg)
    return Split(axis, seg, ())  # (a factor's full shape is checked by read_adapter)


@contextlib.contextmanager
def recording():
    """Note every split MLX's `_shard` makes while the block runs; yields the notes
    (id of the returned array -> (array, Split)) for `attach`."""
    import mlx.nn.layers.distributed as mdist
    from mlx.utils import tree_flatten

    notes: dict = {}
    original = getattr(mdist, "_shard", None)
    if original is None:  # (MLX moved it: nothing is recorded, see the module docstring)
        yield notes
        return

    def _shard(parameters, predicate, group=None):
        out = original(parameters, predicate, group)
        given = dict(tree_flatten(parameters))
        for path, arr in tree_flatten(out):
            src = given.get(path)
            if src is None or arr is src:
                continue
            s = predicate(path, src)
            axis, segments = (s, 1) if isinstance(s, int) else s
            if isinstance(segments, list):
                segments = tuple(segments)
            notes[id(arr)] = (arr, Split(axis % src.ndim, segments, tuple(src.shape)))
        return out

    mdist._shard = _shard
    try:
        yield notes
    finally:
        mdist._shard = original


def attach(model, notes: dict, group) -> ShardPlan:
    """Name the recorded splits by the model's parameters and keep them on the model."""
    from mlx.utils import tree_flatten

    plan = ShardPlan(group.rank(), group.size())
    for name, arr in tree_flatten(model.parameters()):
        note = notes.get(id(arr))
        if note is not None and note[0] is arr:
            plan.splits[name] = note[1]
    inner = getattr(model, "model", None)
    plan.pipelined = getattr(inner, "pipeline_size", 1) > 1
    setattr(model, ATTR, plan)
    notes.clear()
    return plan


def plan_of(model) -> Optional[ShardPlan]:
    """The ShardPlan of a sharded model, None for a model on one rank."""
    return getattr(model, ATTR, None)


PIPELINED = ("this model is split into pipeline stages over the ranks (it has no tensor "
             "sharding); adapters and weight updates are not supported on a pipelined engine yet")
