"""Text <-> token ids in the API worker: tokenizer, chat template, (incremental) detokenizing,
stop strings. The engine sees token ids only.

The tokenizer is `transformers.AutoTokenizer` loaded from the model directory; a Hugging Face
hub id is resolved to its local snapshot as the engine does (`snapshot_download` with
`local_files_only`: nothing is downloaded here). Nothing in this module imports mlx.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Optional, Sequence

from mlxsup.api.errors import invalid

log = logging.getLogger("mlxsup.api")

_CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length",
                 "max_seq_len")


def resolve_model_dir(model: Optional[str]) -> str:
    """Local directory of `model`: the demo model's cache directory for None, the path itself
    for a directory, else the local snapshot of a hub id (never downloaded here)."""
    if model is None:
        from mlxsup.demo import default_demo_dir

        return default_demo_dir()
    if os.path.isdir(model):
        return model
    from huggingface_hub import snapshot_download

    return snapshot_download(model, local_files_only=True)


def context_length(model_dir: str) -> Optional[int]:
    """The model's context length from its config.json, when it states one."""
    try:
        with open(os.path.join(model_dir, "config.json")) as f:
            config = json.load(f)
    except (OSError, ValueError):
        return None
    sources = [config] + [config[k] for k in ("text_config", "llm_config") if isinstance(config.get(k), dict)]
    for source in sources:
        for key in _CONTEXT_KEYS:
            value = source.get(key)
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return value
    return None


class TextCodec:
    """One model's tokenizer, as the API needs it."""

    def __init__(self, tokenizer, context_length: Optional[int] = None, name: str = "model"):
        self.tokenizer = tokenizer
        self.context_length = context_length
        self.name = name
        self.vocab_size = len(tokenizer)

    @classmethod
    def load(cls, model: Optional[str], trust_remote_code: bool = False) -> "TextCodec":
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # "PyTorch was not found" etc.
        from transformers import AutoTokenizer

        model_dir = resolve_model_dir(model)
        tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
        name = model if model is not None else "mlxsup-demo"
        return cls(tokenizer, context_length(model_dir), name=name)

    # ---------------------------------------------------------------- encoding

    def encode(self, text: str, field: str = "prompt") -> list[int]:
        """A text prompt as the seed's server tokenized it: with the tokenizer's special tokens."""
        try:
            ids = list(self.tokenizer.encode(text, add_special_tokens=True))
        except Exception as e:  # a tokenizer refusing some input is the client's problem
            raise invalid(field, f"{field} could not be tokenized: {_short(e)}") from None
        if not ids:
            raise invalid(field, f"{field} tokenizes to no tokens")
        return ids

    def encode_chat(self, messages: Sequence[dict], field: str = "messages") -> list[int]:
        """Chat messages through the model's chat template, with the generation prompt."""
        clean = [{k: v for k, v in m.items() if v is not None or k == "content"} for m in messages]
        for m in clean:
            if isinstance(m.get("content"), list):  # text parts -> one string
                m["content"] = "".join(part["text"] for part in m["content"])
            if m.get("content") is None:
                m["content"] = ""
        if not getattr(self.tokenizer, "chat_template", None):
            raise invalid(field, f"{self.name} has no chat template; send prompt or prompt_ids")
        try:
            text = self.tokenizer.apply_chat_template(clean, tokenize=False, add_generation_prompt=True)
        except Exception as e:  # jinja raises whatever the template author chose
            raise invalid(field, f"the chat template refused these messages: {_short(e)}") from None
        if not isinstance(text, str):
            raise invalid(field, "the chat template did not render text")
        try:
            ids = list(self.tokenizer.encode(text, add_special_tokens=False))
        except Exception as e:
            raise invalid(field, f"{field} could not be tokenized: {_short(e)}") from None
        if not ids:
            raise invalid(field, f"{field} render to no tokens")
        return ids

    def check_ids(self, ids: Sequence[int], field: str) -> None:
        """Token ids must exist in the vocabulary (the engine would index out of range)."""
        vocab = self.vocab_size
        for i, t in enumerate(ids):
            if t >= vocab:
                raise invalid(f"{field}[{i}]", f"{field}[{i}] is not a token id of this model "
                                               f"(vocabulary size {vocab})")

    def check_length(self, num_prompt_tokens: int, max_tokens: int, field: str = "prompt",
                     max_tokens_field: str = "max_tokens") -> None:
        ctx = self.context_length
        if ctx is None:
            return
        if num_prompt_tokens >= ctx:
            raise invalid(field, f"{field} is {num_prompt_tokens} tokens; the model's context is {ctx}")
        if max_tokens > ctx:
            raise invalid(max_tokens_field,
                          f"{max_tokens_field} {max_tokens} exceeds the model's context of {ctx} tokens")

    # ---------------------------------------------------------------- decoding

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def token_text(self, token_id: int) -> str:
        """One token as text (special tokens included), for OpenAI logprobs entries."""
        return self.tokenizer.decode([token_id], skip_special_tokens=False)

    def text_stream(self, stops: Sequence[str] = ()) -> "TextStream":
        return TextStream(self, stops)


def cut_at_stop(text: str, stops: Sequence[str]) -> str:
    """`text` up to (not including) the earliest stop string."""
    cut = len(text)
    for stop in stops:
        at = text.find(stop)
        if 0 <= at < cut:
            cut = at
    return text[:cut]


class TextStream:
    """Incremental detokenizer of one sequence (prefix-window decoding as vLLM does, so words
    split over tokens and multi-byte characters come out whole), holding back text that may
    be the start of a stop string."""

    def __init__(self, codec: TextCodec, stops: Sequence[str] = ()):
        self.codec = codec
        self.stops = tuple(stops)
        self.holdback = max((len(s) for s in self.stops), default=1) - 1
        self.ids: list[int] = []
        self.prefix_offset = 0
        self.read_offset = 0
        self.text = ""  # everything decoded so far
        self.emitted = 0  # characters of self.text already handed out
        self.stopped = False

    def push(self, token_ids: Sequence[int]) -> str:
        """Add tokens; return the text that is now safe to send."""
        if self.stopped:
            return ""
        self.ids.extend(token_ids)
        decode = self.codec.decode
        prefix = decode(self.ids[self.prefix_offset:self.read_offset])
        full = decode(self.ids[self.prefix_offset:])
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            self.text += full[len(prefix):]
            self.prefix_offset = self.read_offset
            self.read_offset = len(self.ids)
        return self._release(final=False)

    def finish(self) -> str:
        """The rest of the text once the sequence is done."""
        if not self.stopped:
            whole = self.codec.decode(self.ids)
            if whole.startswith(self.text):
                self.text = whole
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        text = self.text
        end = len(text)
        if self.stops:
            cut = cut_at_stop(text, self.stops)
            if len(cut) < end:
                end = len(cut)
                self.stopped = True
            elif not final:
                end = max(self.emitted, end - self.holdback)
        out = text[self.emitted:end]
        self.emitted = max(self.emitted, end)
        return out


def _short(e: Exception, limit: int = 300) -> str:
    text = f"{type(e).__name__}: {e}"
    return text if len(text) <= limit else text[: limit - 3] + "..."
