"""Full and partial weight updates of the live model, committed by reference.

A weight directory holds one or more `*.safetensors` files with any subset of the model's
parameters, named as `mlx_lm.load` accepts them: the model's own parameter names
(`tree_flatten(model.parameters())`, what `mlx_lm` and mlx-lm-lora save) or a checkpoint's
Hugging Face names, which go through the model's `sanitize` as `mlx_lm.load` does.

Three stages, as for adapters:
- `read_weights` (numpy only, any thread): parses each file's header, maps the file and views
  every tensor's bytes in place (nothing copied; the pages stay in the page cache), checks the
  framing, the dtypes and that every float is finite. Every problem of every file is collected
  into one `WeightError`.
- `WeightManager.prepare` (engine thread): checks names, shapes and dtypes against the model's
  parameter table (all mismatches in one error), then copies the tensors into MLX arrays. Only
  the replaced tensors exist twice from here to the commit: the old arrays serve until then.
- `WeightManager.commit` (step boundary): one dictionary assignment per tensor on the module
  that owns it. The old arrays are dropped; the engine clears MLX's buffer cache right after.

Quantized layers take quantized tensors only (`weight` as uint32, `scales`, `biases`, all three
together, shapes and dtypes of the model's); a float `weight` for one is refused with the
quantization it needs. LoRA wrappers hold the same base modules, so an adapter prepared after
an update applies on top of the new weights.

On a sharded model (engine/sharding.py) the files hold full tensors, checked against the full
shapes; each rank copies only its slice of a split parameter (cut from the mapped numpy view,
as `model.shard()` cut the checkpoint's), so an update never exists whole in MLX memory.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from typing import Mapping, Optional

import numpy as np

from mlxsup.safetensors_header import HeaderError, read_header

from . import sharding
from .adapter_files import AdapterError

# safetensors dtype -> (numpy dtype of the stored bytes, MLX dtype name)
_DTYPES = {
    "F32": ("<f4", "float32"), "F16": ("<f2", "float16"), "BF16": ("<u2", "bfloat16"),
    "U32": ("<u4", "uint32"), "I32": ("<i4", "int32"), "U8": ("u1", "uint8"),
    "I8": ("i1", "int8"), "I64": ("<i8", "int64"), "U16": ("<u2", "uint16"),
}
_FLOATS = ("float32", "float16", "bfloat16")
MAX_LISTED = 20  # mismatches named in one error; the count says how many more


class WeightError(AdapterError):
    """Weights that cannot be used; the message lists every problem found. `kind` is
    "not_found" for a missing directory (HTTP 404), else "invalid" (HTTP 422)."""


def _raise_all(problems: list[str], what: str) -> None:
    if not problems:
        return
    shown = problems[:MAX_LISTED]
    more = len(problems) - len(shown)
    tail = f"; and {more} more" if more > 0 else ""
    raise WeightError(f"{what}: {len(problems)} problem(s): " + "; ".join(shown) + tail)


@dataclass
class WeightFiles:
    """Validated tensors of a weight directory, viewed in place in the mapped files (numpy;
    bfloat16 tensors hold the raw uint16 bits). `names` in file order."""

    path: str
    tensors: dict[str, np.ndarray] = field(default_factory=dict)
    dtypes: dict[str, str] = field(default_factory=dict)  # name -> MLX dtype name
    files: list[str] = field(default_factory=list)
    nbytes: int = 0


def weight_files_in(path: str) -> list[str]:
    """The safetensors files of a weight directory, sorted (shards in order)."""
    return sorted(f for f in os.listdir(path) if f.endswith(".safetensors") and not f.startswith("."))


def read_weights(path: str) -> WeightFiles:
    """Read and check the weight directory at `path` (numpy only: safe off the engine thread).
    Raises WeightError listing every problem of every file."""
    if not os.path.exists(path):
        raise WeightError(f"weight directory does not exist: {path}", kind="not_found")
    if not os.path.isdir(path):
        raise WeightError(f"weight path is not a directory: {path}")
    names = weight_files_in(path)
    if not names:
        raise WeightError(f"{path} holds no .safetensors files")
    out = WeightFiles(path=path, files=names)
    problems: list[str] = []
    origin: dict[str, str] = {}
    for fname in names:
        full = os.path.join(path, fname)
        size = os.path.getsize(full)
        if size == 0:
            problems.append(f"{fname} is empty")
            continue
        try:
            entries, start = _header(full, fname, size)
        except AdapterError as e:
            problems.append(str(e))
            continue
        data = np.memmap(full, dtype=np.uint8, mode="r")
        for tname, dtype, shape, begin, end in entries:
            where = f"{fname}: tensor {tname!r}"
            if dtype not in _DTYPES:
                problems.append(f"{where}: dtype {dtype!r} is not supported")
                continue
            np_dtype, mx_name = _DTYPES[dtype]
            itemsize = np.dtype(np_dtype).itemsize
            if start + end > size:
                problems.append(f"{where}: its data runs past the end of the file (truncated)")
                continue
            if end - begin != math.prod(shape) * itemsize:
                problems.append(f"{where}: {end - begin} bytes of data for shape {list(shape)} {dtype}")
                continue
            if tname in origin:
                problems.append(f"{where}: also in {origin[tname]}")
                continue
            arr = np.frombuffer(data, dtype=np_dtype, count=math.prod(shape),
                                offset=start + begin).reshape(shape)
            if mx_name in _FLOATS and not _all_finite(arr, mx_name):
                problems.append(f"{where}: holds NaN or infinite values")
                continue
            origin[tname] = fname
            out.tensors[tname] = arr
            out.dtypes[tname] = mx_name
            out.nbytes += end - begin
    _raise_all(problems, f"weights in {path} refused")
    if not out.tensors:
        raise WeightError(f"weights in {path} refused: the files hold no tensors")
    return out


def _header(full: str, fname: str, size: int):
    with open(full, "rb") as f:
        try:
            return read_header(f, size)
        except HeaderError as e:
            raise AdapterError(f"{fname} {e}") from None


def _all_finite(arr: np.ndarray, dtype: str, chunk: int = 1 << 22) -> bool:
    flat = arr.reshape(-1)
    for i in range(0, flat.size, chunk):  # in chunks: no full-size float32 temporary
        part = flat[i : i + chunk]
        if dtype == "bfloat16":  # exponent bits all ones: inf or NaN
            if ((part & 0x7F80) == 0x7F80).any():
                return False
        elif not np.isfinite(part).all():
            return False
    return True


@dataclass(frozen=True)
class ParamSpec:
    shape: tuple
    dtype: str


@dataclass
class PreparedWeights:
    """Tensors ready to commit (MLX arrays evaluated), by parameter name."""

    path: str
    arrays: dict = field(default_factory=dict)
    prepare_ms: float = 0.0
    nbytes: int = 0
    plan_id: Optional[int] = None  # a sharded engine's name for it on the other ranks

    @property
    def names(self) -> list[str]:
        return list(self.arrays)


def _owner(model, name: str):
    """(module, key) holding the parameter `name` (dots; list indices as numbers)."""
    obj = model
    parts = name.split(".")
    for part in parts[:-1]:
        obj = obj[int(part)] if isinstance(obj, list) else obj[part]
    return obj, parts[-1]


class WeightManager:
    """The model's parameter table and the commit of prepared weights.

    The table is taken at start, before any adapter wraps a layer, so names are those of the
    base model (`model.layers.0.self_attn.q_proj.weight`, not `...q_proj.base.weight`)."""

    def __init__(self, model):
        import mlx.core as mx
        from mlx.utils import tree_flatten

        self.model = model
        self.plan = sharding.plan_of(model)
        self.specs: dict[str, ParamSpec] = {}  # full shapes, also on a sharded model
        self._owners: dict[str, tuple] = {}
        for name, arr in tree_flatten(model.parameters()):
            shape = tuple(arr.shape) if self.plan is None else self.plan.full_shape(name, arr.shape)
            self.specs[name] = ParamSpec(shape, str(arr.dtype).replace("mlx.core.", ""))
            self._owners[name] = _owner(model, name)
        # Quantized layers: their (weight, scales[, biases]) go together.
        self.quantized: dict[str, tuple] = {}
        import mlx.nn as nn

        quantized = (nn.QuantizedLinear, nn.QuantizedEmbedding, nn.QuantizedAllToShardedLinear,
                     nn.QuantizedShardedToAllLinear)
        for mname, module in model.named_modules():
            if isinstance(module, quantized):
                leaves = ("weight", "scales") + (("biases",) if module.get("biases") is not None else ())
                self.quantized[mname] = (leaves, module.bits, module.group_size,
                                         getattr(module, "mode", "affine"))
        self._mx = mx
        self.num_updates = 0

    def read(self, path: str) -> WeightFiles:
        if self.plan is not None and self.plan.pipelined:
            raise WeightError(sharding.PIPELINED)
        return read_weights(path)

    def prepare(self, source) -> PreparedWeights:
        """MLX arrays of validated weights (engine thread). `source` is a path or the
        `WeightFiles` of `read` (run in another thread). Raises WeightError listing every
        mismatch; nothing changes on failure."""
        mx = self._mx
        t0 = time.perf_counter()
        plan = self.plan
        if plan is not None and plan.pipelined:
            raise WeightError(sharding.PIPELINED)
        files = self.read(source) if isinstance(source, str) else source
        tensors: Mapping = files.tensors
        dtypes = dict(files.dtypes)
        arrays: Optional[dict] = None
        if any(n not in self.specs for n in tensors) and hasattr(self.model, "sanitize"):
            # Checkpoint names (Hugging Face): mlx_lm.load's own mapping, on MLX arrays.
            arrays = self.model.sanitize({n: _to_mx(mx, a, dtypes[n]) for n, a in tensors.items()})
            dtypes = {n: str(a.dtype).replace("mlx.core.", "") for n, a in arrays.items()}
            tensors = arrays
        problems = self._check(tensors, dtypes)
        _raise_all(problems, f"weights in {files.path} refused")
        if arrays is None:
            take = plan.take if plan is not None else (lambda n, a: a)
            arrays = {n: _to_mx(mx, take(n, a), dtypes[n]) for n, a in tensors.items()}
        elif plan is not None:  # (sanitized: full MLX arrays, cut here)
            arrays = {n: plan.take(n, a, mx) for n, a in arrays.items()}
        mx.eval(list(arrays.values()))
        nbytes = sum(a.nbytes for a in arrays.values())
        return PreparedWeights(files.path, arrays, (time.perf_counter() - t0) * 1e3, nbytes)

    def _check(self, tensors: Mapping, dtypes: Mapping[str, str]) -> list[str]:
        problems = []
        unknown = [n for n in tensors if n not in self.specs]
        if unknown:
            known = len(tensors) - len(unknown)
            hint = (" (none of its names is one of this model's: the weights of another model?)"
                    if known == 0 else "")
            problems.append(f"{len(unknown)} tensor(s) the model has no parameter for{hint}: "
                            + ", ".join(repr(n) for n in unknown[:MAX_LISTED])
                            + (" ..." if len(unknown) > MAX_LISTED else ""))
        for name, arr in tensors.items():
            spec = self.specs.get(name)
            if spec is None:
                continue
            shape, dtype = tuple(arr.shape), dtypes[name]
            module = name.rpartition(".")[0]
            q = self.quantized.get(module)
            if q is not None and (shape != spec.shape or dtype != spec.dtype):
                leaves, bits, group, mode = q
                problems.append(
                    f"tensor {name!r}: layer {module!r} is quantized ({mode}, {bits} bits, group "
                    f"size {group}); it takes quantized {'/'.join(leaves)} tensors, here "
                    f"{spec.shape} {spec.dtype} for {name.rpartition('.')[2]}, not "
                    f"{shape} {dtype} (quantize with mx.quantize(w, group_size={group}, "
                    f"bits={bits}))")
            elif shape != spec.shape:
                problems.append(f"tensor {name!r}: shape {shape} does not match the model's {spec.shape}")
            elif dtype != spec.dtype:
                problems.append(f"tensor {name!r}: dtype {dtype} does not match the model's {spec.dtype}")
        for module, (leaves, *_rest) in self.quantized.items():
            given = [leaf for leaf in leaves if f"{module}.{leaf}" in tensors]
            if given and len(given) != len(leaves):
                missing = [f"{module}.{leaf}" for leaf in leaves if leaf not in given]
                problems.append(f"quantized layer {module!r}: {', '.join(given)} given without "
                                f"{', '.join(missing)} (a quantized layer's tensors go together)")
        return problems

    def commit(self, prepared: PreparedWeights) -> None:
        """Serve `prepared` from now on (call between steps): the modules point at the new
        arrays and drop the old ones."""
        for name, arr in prepared.arrays.items():
            module, key = self._owners[name]
            module[key] = arr
        self.num_updates += 1
        prepared.arrays = {}  # the model holds them now; nothing else should

    def replaced_nbytes(self, names) -> int:
        """Bytes of the current parameters `names` (what exists twice until a commit)."""
        return sum(self._owners[n][0][self._owners[n][1]].nbytes for n in names if n in self._owners)


def _to_mx(mx, arr: np.ndarray, dtype: str):
    if dtype == "bfloat16":
        return mx.array(arr).view(mx.bfloat16)  # arr holds the raw bits as uint16
    return mx.array(arr)


def write_weights(path: str, arrays: Mapping, name: str = "model.safetensors") -> str:
    """Write MLX arrays as one safetensors file in the directory `path` (for tests, benchmarks
    and the GRPO example; trainers use `mx.save_safetensors` the same way)."""
    import mlx.core as mx

    os.makedirs(path, exist_ok=True)
    tmp = os.path.join(path, f".tmp-{name}")  # a dot file: never read as a weight file
    mx.save_safetensors(tmp, dict(arrays))
    os.replace(tmp, os.path.join(path, name))
    return path
