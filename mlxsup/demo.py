"""The built-in demo model: a small random-weight Llama with a real byte-level BPE tokenizer.

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

import numpy as np

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


def save_safetensors(path: str, tensors: dict[str, np.ndarray], dtype: str = "float32") -> None:
    """Write safetensors with numpy alone (bfloat16 as the top half of float32); the demo
    model and the benchmark's adapters are written with it."""
    header, blobs, offset = {}, [], 0
    for name in sorted(tensors):
        arr = np.ascontiguousarray(tensors[name])
        if dtype == "bfloat16":
            data = (arr.astype(np.float32).view(np.uint32) >> 16).astype(np.uint16).tobytes()
            code = "BF16"
        else:
            data, code = arr.astype(np.float32).tobytes(), "F32"
        header[name] = {"dtype": code, "shape": list(arr.shape), "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    header["__metadata__"] = {"format": "mlx"}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for blob in blobs:
            f.write(blob)


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
