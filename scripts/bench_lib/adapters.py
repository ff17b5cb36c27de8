"""LoRA adapters for the swap workload, in mlx-lm's layout, written with numpy alone.

`adapter_config.json` + `adapters.safetensors` with `model.layers.<i>.<key>.lora_a` of shape
(in, rank) and `lora_b` of shape (rank, out), as `mlx_lm.tuner.utils.load_adapters` expects.
`lora_b` is non-zero (unlike a fresh adapter), so each adapter really changes the outputs.
"""

from __future__ import annotations

import json
import os

import numpy as np

from mlxsup.demo import save_safetensors

KEYS = ("self_attn.q_proj", "self_attn.v_proj")


def write_adapter(model_dir: str, out_dir: str, seed: int, rank: int = 8, scale: float = 20.0,
                  num_layers: int = -1) -> str:
    """Write a LoRA adapter for the Llama-style model in `model_dir` into `out_dir`."""
    with open(os.path.join(model_dir, "config.json")) as f:
        cfg = json.load(f)
    hidden = cfg["hidden_size"]
    layers = cfg["num_hidden_layers"]
    heads = cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim") or hidden // heads
    kv = cfg.get("num_key_value_heads", heads) * head_dim
    out_dims = {"self_attn.q_proj": heads * head_dim, "self_attn.v_proj": kv}
    num_layers = layers if num_layers < 0 else min(num_layers, layers)
    rng = np.random.default_rng(seed)
    tensors = {}
    for i in range(layers - num_layers, layers):
        for key in KEYS:
            name = f"model.layers.{i}.{key}"
            bound = 1.0 / np.sqrt(hidden)
            tensors[name + ".lora_a"] = rng.uniform(-bound, bound, (hidden, rank)).astype(np.float32)
            tensors[name + ".lora_b"] = (rng.standard_normal((rank, out_dims[key])) * 0.05).astype(np.float32)
    os.makedirs(out_dir, exist_ok=True)
    save_safetensors(os.path.join(out_dir, "adapters.safetensors"), tensors)
    config = {
        "fine_tune_type": "lora",
        "num_layers": num_layers,
        "lora_parameters": {"rank": rank, "scale": scale, "dropout": 0.0, "keys": list(KEYS)},
        # What trainers' configs carry besides; the server must tolerate it.
        "model_type": cfg.get("model_type", "llama"),
    }
    with open(os.path.join(out_dir, "adapter_config.json"), "w") as f:
        json.dump(config, f, indent=2)
    return out_dir
