"""Text <-> token ids in the API worker: tokenizer, chat template, (incremental) detokenizing,
stop strings. The engine sees token ids only.

The tokenizer is the model's `tokenizer.json`, loaded with `tokenizers` (the library behind
transformers' fast tokenizers), and chat templates render with jinja2 (`chat_template.py`):
transformers is not imported, because where torch is installed it pulls torch into every API
worker (833 MiB RSS each on the GPU host; docs/reliability.md, "API worker memory"). A model
without `tokenizer.json`, or whose tokenizer is remote code (`--trust-remote-code`), is loaded
through transformers when it is installed, and its fast tokenizer's backend used the same way.
A Hugging Face hub id is resolved to its local snapshot with huggingface_hub, as the engine
does. Nothing in this module imports mlx.

The tokenizer is the file as written: transformers 5 rebuilds parts of some model-specific
classes from their Python definition instead (Qwen2Tokenizer's pre-tokenizer regex, the
Mistral regex patch for vocabularies over 100k), which matters only for a tokenizer.json that
disagrees with its own class. tests/test_api_textcodec.py checks ids, text and chat
renderings against transformers.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Optional, Sequence

from tokenizers import AddedToken, Tokenizer

from mlxsup.api import chat_template
from mlxsup.api.errors import invalid

log = logging.getLogger("mlxsup.api")

_CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length",
                 "max_seq_len")
# What the API worker needs of a hub snapshot that is not on disk yet: never the weights.
_TOKENIZER_FILES = ["*.json", "*.jinja", "additional_chat_templates/*", "*.model", "*.tiktoken", "*.txt",
                    "*.py"]


def resolve_model_dir(model: Optional[str]) -> str:
    """Local directory of `model`: the demo model's cache directory for None, the path itself
    for a directory, else the snapshot of a hub id: the cached one, or its tokenizer and config
    files fetched (never the weights; the engine fetches those)."""
    if model is None:
        from mlxsup.demo import default_demo_dir

        return default_demo_dir()
    if os.path.isdir(model):
        return model
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError
    except ImportError:
        raise RuntimeError(f"model {model!r} is not a directory, and resolving a Hugging Face hub id needs "
                           "huggingface_hub (pip install huggingface_hub)") from None
    try:
        return snapshot_download(model, local_files_only=True)
    except LocalEntryNotFoundError:
        return snapshot_download(model, allow_patterns=_TOKENIZER_FILES)


def context_length(model_dir: str) -> Optional[int]:
    """The model's context length from its config.json, when it states one."""
    config = _read_json(os.path.join(model_dir, "config.json"))
    sources = [config] + [config[k] for k in ("text_config", "llm_config") if isinstance(config.get(k), dict)]
    for source in sources:
        for key in _CONTEXT_KEYS:
            value = source.get(key)
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return value
    return None


def special_tokens(tokenizer_config: dict, model_dir: Optional[str] = None) -> tuple[dict, list]:
    """(named, extra): the named special tokens as strings (`bos_token` -> "<s>", what chat
    templates see) and AddedTokens of every special token the config declares, as
    transformers reads them from tokenizer_config.json (special_tokens_map.json fills gaps)."""
    config = dict(tokenizer_config)
    if model_dir is not None:
        for key, value in _read_json(os.path.join(model_dir, "special_tokens_map.json")).items():
            config.setdefault(key, value)
    named, tokens = {}, []
    for key in chat_template.NAMED_SPECIAL_TOKENS:
        token = _added_token(config.get(key))
        if token is not None:
            named[key] = token.content
            tokens.append(token)
    for key in ("extra_special_tokens", "additional_special_tokens"):
        values = config.get(key)
        if isinstance(values, dict):  # model-specific names: {"image_token": "<image>"}
            values = list(values.values())
        for value in values if isinstance(values, list) else ():
            token = _added_token(value)
            if token is not None:
                tokens.append(token)
    return named, tokens


def _added_token(value) -> Optional[AddedToken]:
    if isinstance(value, str) and value:
        return AddedToken(value, special=True, normalized=False)
    if isinstance(value, dict) and value.get("content"):
        props = {k: value[k] for k in ("single_word", "lstrip", "rstrip", "normalized") if k in value}
        return AddedToken(value["content"], special=True, **props)
    return None


class TextCodec:
    """One model's tokenizer and chat template, as the API needs them.

    `tokenizer` is a `tokenizers.Tokenizer` with the model's special tokens registered;
    `template` its chat template (a string, named templates, or None); `named_specials` what
    templates see as `bos_token`, `eos_token`, ...; `clean_up_spaces` transformers'
    `clean_up_tokenization_spaces` (applied, as transformers does, to non-BPE models only)."""

    def __init__(self, tokenizer: Tokenizer, *, template: Optional[chat_template.Template] = None,
                 named_specials: Optional[dict] = None, context_length: Optional[int] = None,
                 name: str = "model", clean_up_spaces: bool = False,
                 tool_parser_type: Optional[str] = None):
        self.tokenizer = tokenizer
        self.tool_parser_type = tool_parser_type  # mlx-lm's, when tokenizer_config.json names one
        self.template = template
        self.named_specials = dict(named_specials or {})
        self.context_length = context_length
        self.name = name
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
        self.clean_up_spaces = clean_up_spaces and type(tokenizer.model).__name__ != "BPE"

    @classmethod
    def load(cls, model: Optional[str], trust_remote_code: bool = False) -> "TextCodec":
        model_dir = resolve_model_dir(model)
        config = _read_json(os.path.join(model_dir, "tokenizer_config.json"))
        tokenizer_file = os.path.join(model_dir, "tokenizer.json")
        remote = trust_remote_code and "AutoTokenizer" in json.dumps(config.get("auto_map", {}))
        if remote or not os.path.isfile(tokenizer_file):
            tokenizer, template = _from_transformers(model_dir, trust_remote_code)
        else:
            tokenizer = Tokenizer.from_file(tokenizer_file)
            template = chat_template.find_chat_template(model_dir, config)
        # A tokenizer.json may carry truncation or padding settings; transformers turns them
        # off for every call that does not ask for them, and so does the API: whole prompts.
        tokenizer.no_truncation()
        tokenizer.no_padding()
        named, specials = special_tokens(config, model_dir)
        _register_added_tokens(tokenizer, config, specials)
        return cls(tokenizer, template=template, named_specials=named, context_length=context_length(model_dir),
                   name=model if model is not None else "mlxsup-demo",
                   clean_up_spaces=bool(config.get("clean_up_tokenization_spaces", False)),
                   tool_parser_type=config.get("tool_parser_type"))

    # ---------------------------------------------------------------- encoding

    def encode(self, text: str, field: str = "prompt") -> list[int]:
        """A text prompt as the seed's server tokenized it: with the tokenizer's special tokens."""
        ids = self._encode(text, field, add_special_tokens=True)
        if not ids:
            raise invalid(field, f"{field} tokenizes to no tokens")
        return ids

    def render_chat(self, messages: Sequence[dict], field: str = "messages", tools: Optional[list] = None,
                    *, add_generation_prompt: bool = True, continue_final_message: bool = False) -> str:
        """Chat messages through the model's chat template, with the generation prompt. Text
        parts are joined into one string and a null content is empty, as text-only templates
        expect; `tools` (JSON schemas) are handed to the template as given.
        `continue_final_message` (vLLM's and transformers' option) renders without the
        generation prompt and ends the text at the end of the last message's content, so the
        model continues that message."""
        clean = [{k: v for k, v in m.items() if v is not None or k == "content"} for m in messages]
        for m in clean:
            if isinstance(m.get("content"), list):  # text parts -> one string
                m["content"] = "".join(part["text"] for part in m["content"])
            if m.get("content") is None:
                m["content"] = ""
        if not self.template:
            raise invalid(field, f"{self.name} has no chat template; send prompt or prompt_ids")
        try:
            template = chat_template.pick_template(self.template, tools is not None)
            text = chat_template.render(template, clean, special_tokens=self.named_specials, tools=tools,
                                        add_generation_prompt=add_generation_prompt and not continue_final_message)
        except chat_template.ChatTemplateError as e:
            raise invalid(field, f"the chat template refused these messages: {_clip(str(e))}") from None
        if continue_final_message:
            last = clean[-1]["content"] if clean else ""
            at = text.rfind(last) if last else -1
            if at < 0:
                raise invalid(field, "continue_final_message: the last message's content is not in the "
                                     "rendered text")
            text = text[:at + len(last)]
        return text

    def encode_chat(self, messages: Sequence[dict], field: str = "messages", tools: Optional[list] = None,
                    *, add_generation_prompt: bool = True, continue_final_message: bool = False) -> list[int]:
        """`render_chat`'s text as token ids (the template writes the special tokens itself)."""
        text = self.render_chat(messages, field, tools, add_generation_prompt=add_generation_prompt,
                                continue_final_message=continue_final_message)
        ids = self._encode(text, field, add_special_tokens=False)
        if not ids:
            raise invalid(field, f"{field} render to no tokens")
        return ids

    def _encode(self, text: str, field: str, add_special_tokens: bool) -> list[int]:
        try:
            return self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids
        except Exception as e:  # a tokenizer refusing some input is the client's problem
            raise invalid(field, f"{field} could not be tokenized: {_clip(f'{type(e).__name__}: {e}')}") from None

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
        text = self.tokenizer.decode(list(ids), skip_special_tokens=True)
        return _clean_up_spaces(text) if self.clean_up_spaces else text

    def token_text(self, token_id: int) -> str:
        """One token as text (special tokens included), for OpenAI logprobs entries."""
        text = self.tokenizer.decode([token_id], skip_special_tokens=False)
        return _clean_up_spaces(text) if self.clean_up_spaces else text

    def text_stream(self, stops: Sequence[str] = ()) -> "TextStream":
        return TextStream(self, stops)


def _clean_up_spaces(text: str) -> str:
    """transformers' `clean_up_tokenization` (for WordPiece-era tokenizers that ask for it)."""
    for before, after in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                          (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
        text = text.replace(before, after)
    return text


def _register_added_tokens(tokenizer: Tokenizer, config: dict, specials: list) -> None:
    """Add what tokenizer_config.json declares beyond tokenizer.json, as transformers does when
    it loads one: its `added_tokens_decoder` entries missing from the tokenizer, then every
    named and extra special token as special (an id the vocabulary has already keeps it)."""
    present = {t.content for t in tokenizer.get_added_tokens_decoder().values()}
    decoder = config.get("added_tokens_decoder")
    for _, value in sorted(decoder.items(), key=lambda kv: int(kv[0])) if isinstance(decoder, dict) else ():
        if isinstance(value, dict) and value.get("content") and value["content"] not in present:
            props = {k: value[k] for k in ("single_word", "lstrip", "rstrip", "normalized", "special") if k in value}
            tokenizer.add_tokens([AddedToken(value["content"], **props)])
    if specials:
        tokenizer.add_special_tokens(specials)


def _from_transformers(model_dir: str, trust_remote_code: bool):
    """(backend tokenizer, chat template) through transformers, for a model without
    tokenizer.json or with a remote-code tokenizer: its fast tokenizer's `tokenizers` backend
    is what the codec uses, so only loading differs."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # "PyTorch was not found" etc.
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise RuntimeError(f"{model_dir} has no tokenizer.json (or its tokenizer is remote code): loading it "
                           "needs transformers (pip install transformers)") from None
    log.warning("loading the tokenizer of %s through transformers (no tokenizer.json, or remote code): each "
                "API worker imports transformers, and torch where it is installed", model_dir)
    hf = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    backend = getattr(hf, "backend_tokenizer", None)
    if backend is None:
        raise RuntimeError(f"the tokenizer of {model_dir} is a slow (Python) one; mlxsup needs a fast tokenizer "
                           "(save it with tokenizer.json)")
    return backend, hf.chat_template


def _read_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


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


def _clip(text: str, limit: int = 300) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."
