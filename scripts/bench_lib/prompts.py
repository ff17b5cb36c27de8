"""Fixed prompts from a seeded RNG, cut to exact token lengths with the model's own tokenizer.

Every system gets the same texts. The servers tokenize them themselves (as they would for a
user); the raw loop gets the ids this module computes with the same Hugging Face tokenizer,
which is what mlx-lm's server uses too. Lengths count the BOS token the tokenizer adds.
"""

from __future__ import annotations

import math
import os
import random
from dataclasses import dataclass

_FALLBACK_WORDS = (
    "the policy samples a completion and the trainer scores it with a reward model then "
    "updates the adapter weights so the next rollout is better than the last one every "
    "token carries a log probability and a version number"
).split()


@dataclass(frozen=True)
class Prompt:
    text: str
    ids: tuple[int, ...]  # as the model's tokenizer encodes `text`, BOS included


class Tokenizer:
    """encode/decode with the model directory's tokenizer (transformers if present, else the
    `tokenizers` library on tokenizer.json), plus the EOS ids to suppress."""

    def __init__(self, model_dir: str):
        self._hf = None
        self._tok = None
        try:
            from transformers import AutoTokenizer

            self._hf = AutoTokenizer.from_pretrained(model_dir)
        except Exception:  # no transformers, or no torch-free path: tokenizer.json is enough
            from tokenizers import Tokenizer as _T

            self._tok = _T.from_file(os.path.join(model_dir, "tokenizer.json"))
        self.eos_ids = _eos_ids(model_dir, self)

    def encode(self, text: str) -> list[int]:
        if self._hf is not None:
            return list(self._hf.encode(text))
        return list(self._tok.encode(text).ids)

    def encode_plain(self, text: str) -> list[int]:
        """Without special tokens (no BOS)."""
        if self._hf is not None:
            return list(self._hf.encode(text, add_special_tokens=False))
        return list(self._tok.encode(text, add_special_tokens=False).ids)

    def num_added(self) -> int:
        """How many special tokens `encode` adds (1 for a BOS)."""
        return len(self.encode("hello")) - len(self.encode_plain("hello"))

    def decode(self, ids) -> str:
        if self._hf is not None:
            return self._hf.decode(list(ids), skip_special_tokens=True)
        return self._tok.decode(list(ids), skip_special_tokens=True)

    def token_id(self, token: str):
        if self._hf is not None:
            tid = self._hf.convert_tokens_to_ids(token)
            return None if tid == self._hf.unk_token_id else tid
        return self._tok.token_to_id(token)


def _eos_ids(model_dir: str, tok: Tokenizer) -> list[int]:
    import json

    ids: set[int] = set()
    for name in ("generation_config.json", "config.json"):
        try:
            with open(os.path.join(model_dir, name)) as f:
                value = json.load(f).get("eos_token_id")
        except (OSError, ValueError):
            continue
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, list):
            ids.update(v for v in value if isinstance(v, int))
    if tok._hf is not None and tok._hf.eos_token_id is not None:
        ids.add(int(tok._hf.eos_token_id))
    return sorted(ids)


def _words() -> list[str]:
    try:
        from importlib import resources

        text = resources.files("mlxsup").joinpath("data/corpus.txt").read_text("utf-8")
        words = text.split()
        return words if len(words) > 50 else _FALLBACK_WORDS
    except Exception:
        return list(_FALLBACK_WORDS)


def make_prompt(tok: Tokenizer, rng: random.Random, num_tokens: int) -> Prompt:
    """A prompt of exactly `num_tokens` tokens (BOS included) where the tokenizer allows:
    random words, cut at a token boundary, decoded and re-encoded. A cut can re-merge into one
    token fewer, so nearby cuts are tried until the round trip gives the exact count: with
    equal lengths no batch needs padding, whose new shapes MLX would compile mid-measurement
    (seen on CUDA: 6.8 s before the first token of a level that had one 99-token prompt)."""
    words = _words()
    num_tokens = max(2, num_tokens)
    want = max(1, num_tokens - tok.num_added())
    best = None
    for _ in range(20):  # fresh words when no cut of these round-trips to the exact count
        text = ""
        ids: list[int] = []
        while len(ids) < want + 16:
            text += " ".join(rng.choice(words) for _ in range(max(8, want))) + " "
            ids = tok.encode_plain(text)
        for cut in (want, want + 1, want - 1, want + 2, want - 2):
            if cut < 1:
                continue
            candidate = tok.decode(ids[:cut]).strip()
            encoded = tuple(tok.encode(candidate))
            if len(encoded) == num_tokens:
                return Prompt(text=candidate, ids=encoded)
            if best is None or abs(len(encoded) - num_tokens) < abs(len(best.ids) - num_tokens):
                best = Prompt(text=candidate, ids=encoded)
    return best


def fixed_prompts(tok: Tokenizer, seed: int, count: int, num_tokens: int) -> list[Prompt]:
    rng = random.Random(seed)
    return [make_prompt(tok, rng, num_tokens) for _ in range(count)]


def mixed_prompts(tok: Tokenizer, seed: int, count: int, lo: int, hi: int) -> list[Prompt]:
    """Prompt lengths log-uniform in [lo, hi] tokens (so short and long both occur often)."""
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        n = int(round(math.exp(rng.uniform(math.log(lo), math.log(hi)))))
        out.append(make_prompt(tok, rng, n))
    return out
