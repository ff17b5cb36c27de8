"""The built-in demo model: a small random-weight Llama with a real byte-level BPE tokenizer;
and LoRA adapters for it or any Llama-layout model (`write_random_adapter`, `write_adapter`).

It is written in the mlx-lm / Hugging Face layout (config.json, model.safetensors,
tokenizer.json, tokenizer_config.json with a chat template and an end-of-turn token), so it
loads with `mlx_lm.load` and `transformers.AutoTokenizer`. Nothing is downloaded: the
tokenizer is trained on text this package ships plus sentences generated from a seed, and the
weights are drawn with numpy, so the same seed gives the same files on every machine.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from dataclasses import dataclass
from importlib import resources
from typing import Mapping, Optional, Sequence

import numpy as np

from mlxsup.safetensors_header import CONFIG_NAME, WEIGHTS_NAME

BOS = "<|bos|>"
EOT = "<|eot|>"
PAD = "<|pad|>"
START = "<|start|>"
SPECIAL_TOKENS = [PAD, BOS, EOT, START]

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|start|>{{ message['role'] }}\n{{ message['content'] }}<|eot|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|start|>assistant\n{% endif %}"
)


@dataclass(frozen=True)
class DemoPreset:
    hidden_size: int
    num_hidden_layers: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int
    tie_word_embeddings: bool = True
    dtype: str = "float32"


PRESETS = {
    # For tests: builds in about a second, generates thousands of tokens/s on a CPU.
    "tiny": DemoPreset(64, 2, 128, 4, 2, 512),
    # The default demo model: about 3M parameters.
    "demo": DemoPreset(256, 4, 512, 4, 2, 2048),
    # About 75M parameters: the CPU benchmark model.
    "bench75m": DemoPreset(640, 12, 2048, 10, 5, 8192, tie_word_embeddings=False),
    # About 1B parameters in bfloat16: the GPU benchmark model.
    "bench1b": DemoPreset(2048, 20, 5632, 32, 8, 25000, tie_word_embeddings=False, dtype="bfloat16"),
    # About 7B parameters in bfloat16 (Llama-3-8B's layers, a 32k vocabulary): the single-GPU
    # baseline of the sharded engine's multi-GPU measurement (docs/benchmarks-gpu.md).
    "bench8b": DemoPreset(4096, 32, 14336, 32, 8, 32000, tie_word_embeddings=False, dtype="bfloat16"),
}


def default_demo_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "mlxsup", "demo-model")


SYLLABLES = [c + v for c in "bdfgklmnprstvz" for v in ("a", "e", "i", "o", "u", "ai", "ou")]


def _corpus(seed: int, vocab_size: int) -> list[str]:
    """The shipped text, sums, sentences of its words and, for large vocabularies, made-up
    words, so the BPE trainer finds as many merges as the vocabulary asks for."""
    shipped = resources.files("mlxsup").joinpath("data/corpus.txt").read_text("utf-8")
    lines = [line for line in shipped.splitlines() if line.strip()]
    words = sorted({w.strip(".,!?:;()\"'") for line in lines for w in line.split()} - {""})
    rng = random.Random(seed)
    for _ in range(4000):
        if rng.randrange(3) == 0:
            a, b = rng.randrange(100), rng.randrange(100)
            lines.append(f"{a} + {b} = {a + b}")
        else:
            lines.append(" ".join(rng.choice(words) for _ in range(rng.randrange(4, 16))) + ".")
    if vocab_size > 1000:
        made_up = ["".join(rng.choice(SYLLABLES) for _ in range(rng.randrange(2, 5))) for _ in range(vocab_size)]
        for _ in range(vocab_size // 2):
            lines.append(" ".join(rng.choice(made_up) for _ in range(12)))
    return lines


def build_tokenizer(vocab_size: int, seed: int = 0):
    """Train a byte-level BPE tokenizer (a `tokenizers.Tokenizer`) on the shipped corpus."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(seed, vocab_size), trainer=trainer)
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, bos_id)]
    )
    return tok


def _weights(preset: DemoPreset, vocab_size: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    h, f = preset.hidden_size, preset.intermediate_size
    head_dim = h // preset.num_attention_heads
    kv = preset.num_key_value_heads * head_dim

    def normal(shape, std):
        return (rng.standard_normal(shape, dtype=np.float32) * std).astype(np.float32)

    # Embeddings wide enough that sampling at T=1 is neither uniform nor deterministic.
    w = {"model.embed_tokens.weight": normal((vocab_size, h), 0.1), "model.norm.weight": np.ones(h, np.float32)}
    std = 0.5 / np.sqrt(h)
    for i in range(preset.num_hidden_layers):
        p = f"model.layers.{i}."
        w[p + "self_attn.q_proj.weight"] = normal((h, h), std)
        w[p + "self_attn.k_proj.weight"] = normal((kv, h), std)
        w[p + "self_attn.v_proj.weight"] = normal((kv, h), std)
        w[p + "self_attn.o_proj.weight"] = normal((h, h), std)
        w[p + "mlp.gate_proj.weight"] = normal((f, h), std)
        w[p + "mlp.up_proj.weight"] = normal((f, h), std)
        w[p + "mlp.down_proj.weight"] = normal((h, f), 0.5 / np.sqrt(f))
        w[p + "input_layernorm.weight"] = np.ones(h, np.float32)
        w[p + "post_attention_layernorm.weight"] = np.ones(h, np.float32)
    if not preset.tie_word_embeddings:
        w["lm_head.weight"] = normal((vocab_size, h), 0.1)
    return w


def safetensors_bytes(tensors: Mapping[str, np.ndarray], dtype: Optional[str] = None) -> bytes:
    """A safetensors file holding `tensors` (by name), written with numpy alone. `dtype`
    "bfloat16" stores the top half of each float32, "float32" casts to it; None keeps float16
    arrays as F16 and stores everything else as float32."""
    header, blobs, offset = {}, [], 0
    for name in sorted(tensors):
        arr = np.ascontiguousarray(tensors[name])
        if dtype == "bfloat16":
            data = (arr.astype(np.float32).view(np.uint32) >> 16).astype(np.uint16).tobytes()
            code = "BF16"
        elif dtype is None and arr.dtype == np.float16:
            data, code = arr.astype("<f2").tobytes(), "F16"
        else:
            data, code = arr.astype("<f4").tobytes(), "F32"
        header[name] = {"dtype": code, "shape": list(arr.shape), "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    header["__metadata__"] = {"format": "mlx"}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return len(raw).to_bytes(8, "little") + raw + b"".join(blobs)


def save_safetensors(path: str, tensors: Mapping[str, np.ndarray], dtype: Optional[str] = "float32") -> None:
    """Write `safetensors_bytes(tensors, dtype)` to `path`: the demo model, test models and
    adapters are written with it."""
    with open(path, "wb") as f:
        f.write(safetensors_bytes(tensors, dtype))


def build_demo_model(out_dir: str, seed: int = 0, preset: str = "demo") -> str:
    """Write the demo model into `out_dir` (created; files replaced) and return its path."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    p = PRESETS[preset]
    os.makedirs(out_dir, exist_ok=True)
    tok = build_tokenizer(p.vocab_size, seed)
    vocab_size = tok.get_vocab_size()
    tok.save(os.path.join(out_dir, "tokenizer.json"))
    ids = {t: tok.token_to_id(t) for t in SPECIAL_TOKENS}
    config = {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": p.hidden_size,
        "num_hidden_layers": p.num_hidden_layers,
        "intermediate_size": p.intermediate_size,
        "num_attention_heads": p.num_attention_heads,
        "num_key_value_heads": p.num_key_value_heads,
        "rms_norm_eps": 1e-5,
        "vocab_size": vocab_size,
        "rope_theta": 10000.0,
        "max_position_embeddings": 4096,
        "tie_word_embeddings": p.tie_word_embeddings,
        "bos_token_id": ids[BOS],
        "eos_token_id": ids[EOT],
        "pad_token_id": ids[PAD],
        "torch_dtype": p.dtype,
        "mlxsup_demo": {"preset": preset, "seed": seed},
    }
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    tok_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS,
        "eos_token": EOT,
        "pad_token": PAD,
        "chat_template": CHAT_TEMPLATE,
        "model_max_length": 4096,
        "clean_up_tokenization_spaces": False,
    }
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
        json.dump(tok_config, f, indent=2)
    with open(os.path.join(out_dir, "special_tokens_map.json"), "w") as f:
        json.dump({"bos_token": BOS, "eos_token": EOT, "pad_token": PAD}, f, indent=2)
    with open(os.path.join(out_dir, "generation_config.json"), "w") as f:
        json.dump({"bos_token_id": ids[BOS], "eos_token_id": [ids[EOT]]}, f, indent=2)
    save_safetensors(os.path.join(out_dir, "model.safetensors"), _weights(p, vocab_size, seed), p.dtype)
    return out_dir


def ensure_demo_model(path: str | None = None, seed: int = 0, preset: str = "demo") -> str:
    """Return the cached demo model's directory, building it there first if it is missing.

    Built in a temporary sibling and renamed into place, so a crash halfway never leaves a
    directory that looks complete."""
    path = path or default_demo_dir()
    if os.path.exists(os.path.join(path, "model.safetensors")):
        return path
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".demo-", dir=parent)
    try:
        build_demo_model(tmp, seed=seed, preset=preset)
        try:
            os.rename(tmp, path)
        except OSError:  # another process won the race
            if not os.path.exists(os.path.join(path, "model.safetensors")):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


# ---------------------------------------------------------------------- adapters

ATTENTION_KEYS = ("self_attn.q_proj", "self_attn.v_proj")  # mlx-lm's default LoRA targets


def write_adapter(path: str, tensors: Mapping[str, np.ndarray], rank: int, scale: float,
                  fine_tune_type: str = "lora", extra_config: Optional[dict] = None) -> str:
    """Write an adapter directory in mlx-lm's format (`adapter_config.json` +
    `adapters.safetensors`, float32 or float16 tensors as given) and return its path; keys of
    `extra_config` replace or join the config's. For tests, benchmarks and scripts: trainers
    write theirs with mlx-lm."""
    os.makedirs(path, exist_ok=True)
    cfg = {"fine_tune_type": fine_tune_type, "num_layers": -1,
           "lora_parameters": {"rank": rank, "scale": scale, "dropout": 0.0}}
    cfg.update(extra_config or {})
    with open(os.path.join(path, CONFIG_NAME), "w") as f:
        json.dump(cfg, f)
    save_safetensors(os.path.join(path, WEIGHTS_NAME), tensors, dtype=None)
    return str(path)


def linear_dims(model_config: Mapping, key: str) -> tuple[int, int]:
    """(input_dims, output_dims) of the linear layer `key` ("self_attn.q_proj", "mlp.down_proj",
    ...) of a block of the Llama-layout model whose config.json is `model_config`."""
    hidden, heads = model_config["hidden_size"], model_config["num_attention_heads"]
    head_dim = model_config.get("head_dim") or hidden // heads
    q, kv = heads * head_dim, model_config.get("num_key_value_heads", heads) * head_dim
    inter = model_config.get("intermediate_size", 0)
    dims = {"self_attn.q_proj": (hidden, q), "self_attn.k_proj": (hidden, kv), "self_attn.v_proj": (hidden, kv),
            "self_attn.o_proj": (q, hidden), "mlp.gate_proj": (hidden, inter), "mlp.up_proj": (hidden, inter),
            "mlp.down_proj": (inter, hidden)}  # fmt: skip
    if key not in dims:
        raise ValueError(f"unknown linear layer {key!r}; one of {sorted(dims)}")
    return dims[key]


def write_random_adapter(path, model_dir: str, seed: int = 0, *, keys: Sequence[str] = ATTENTION_KEYS,
                         rank: int = 8, scale: float = 20.0, std: float = 0.3, num_layers: Optional[int] = None,
                         extra_config: Optional[dict] = None) -> str:
    """A LoRA adapter for the Llama-layout model in `model_dir` (the demo model, a test model),
    written in mlx-lm's format; returns its directory. `lora_a` and `lora_b` of each of `keys`
    in the last `num_layers` blocks (None: every block) are drawn from N(0, std) with `seed`:
    both nonzero (unlike a fresh adapter), so the adapter really changes the outputs."""
    with open(os.path.join(model_dir, "config.json")) as f:
        cfg = json.load(f)
    total = cfg["num_hidden_layers"]
    num_layers = total if num_layers is None else min(num_layers, total)
    rng = np.random.default_rng(seed)
    tensors = {}
    for i in range(total - num_layers, total):
        for key in keys:
            in_dims, out_dims = linear_dims(cfg, key)
            tensors[f"model.layers.{i}.{key}.lora_a"] = rng.normal(0, std, (in_dims, rank)).astype(np.float32)
            tensors[f"model.layers.{i}.{key}.lora_b"] = rng.normal(0, std, (rank, out_dims)).astype(np.float32)
    config = {"num_layers": num_layers,
              "lora_parameters": {"rank": rank, "scale": scale, "dropout": 0.0, "keys": list(keys)}}
    return write_adapter(path, tensors, rank, scale, extra_config={**config, **(extra_config or {})})
