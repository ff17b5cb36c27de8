"""Tool calls in chat completions, with mlx-lm's tool parsers.

mlx-lm knows, per model family, the markers around a tool call in the generated text and how
to parse what lies between them (`mlx_lm/tool_parsers/<family>.py`: `tool_call_start`,
`tool_call_end`, `parse_tool_call(text, tools)`), and which family a tokenizer belongs to
(`tool_parser_type` in tokenizer_config.json, else inferred from the chat template or the
vocabulary by `mlx_lm.tokenizer_utils._infer_tool_parser`). We use that code as it is. API
workers never import mlx (importing anything under the `mlx_lm` package runs its `__init__`,
which imports mlx) nor transformers; so the parser modules are loaded from the installed
package's directory under a private package name (they import only the standard library and
`regex`), and the inference function is compiled alone from its file. A model without a
parser gets its text back as is.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import json
import logging
import secrets
import sys
from dataclasses import dataclass, field
from typing import Callable, Optional

log = logging.getLogger("mlxsup.api")

_PACKAGE = "_mlxsup_mlx_lm_tool_parsers"


def _mlx_lm_dir() -> Optional[str]:
    spec = importlib.util.find_spec("mlx_lm")  # (finds the package without running it)
    return None if spec is None or not spec.submodule_search_locations else \
        list(spec.submodule_search_locations)[0]


def _load_file(name: str, path: str, package_dir: Optional[str] = None):
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(
        name, path, submodule_search_locations=[package_dir] if package_dir else None)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)
        raise
    return module


def _mlx_lm_inference():
    """mlx-lm's `_infer_tool_parser` (and the helper it calls) from the installed
    tokenizer_utils.py, compiled alone: the module imports transformers at its top, which API
    workers do not load (it pulls in torch where torch is installed)."""
    root = _mlx_lm_dir()
    if root is None:
        return None
    path = f"{root}/tokenizer_utils.py"
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), path)
    wanted = {"_infer_tool_parser", "_is_xtml_vocab"}
    body = [node for node in tree.body if isinstance(node, ast.FunctionDef) and node.name in wanted]
    namespace: dict = {}
    exec(compile(ast.Module(body=body, type_ignores=[]), path, "exec"), namespace)
    return namespace.get("_infer_tool_parser")


@dataclass(frozen=True)
class _TemplateView:
    """What `_infer_tool_parser` reads of a tokenizer: its chat template and vocabulary."""

    chat_template: Optional[str]
    vocab: dict

    def get_vocab(self) -> dict:
        return self.vocab


def parser_type(codec) -> Optional[str]:
    """The mlx-lm tool parser family of a TextCodec's model: `tool_parser_type` of its
    tokenizer_config.json, else inferred from the chat template or vocabulary as mlx-lm does."""
    kind = getattr(codec, "tool_parser_type", None)
    if kind:
        return kind
    infer = _mlx_lm_inference()
    if infer is None:
        return None
    template = codec.template
    if isinstance(template, dict):  # named templates: the one used with tools
        template = template.get("tool_use") or template.get("default")
    return infer(_TemplateView(template, codec.tokenizer.get_vocab(with_added_tokens=True)))


@dataclass(frozen=True)
class ToolParser:
    """One family's markers and parse function."""

    kind: str
    start: str
    end: str
    parse: Callable

    @classmethod
    def for_codec(cls, codec) -> Optional["ToolParser"]:
        try:
            kind = parser_type(codec)
            if kind is None:
                return None
            root = _mlx_lm_dir()
            _load_file(_PACKAGE, f"{root}/tool_parsers/__init__.py", f"{root}/tool_parsers")
            module = importlib.import_module(f"{_PACKAGE}.{kind}")
        except Exception as e:  # no parser for this family: text as is
            log.warning("no tool parser for this tokenizer: %s", e)
            return None
        return cls(kind, module.tool_call_start, module.tool_call_end, module.parse_tool_call)

    def calls(self, texts: list[str], tools) -> list[dict]:
        """OpenAI `tool_calls` entries from the texts between the markers; a text that does
        not parse (a call cut by max_tokens) is left out, as mlx-lm does."""
        out = []
        for text in texts:
            try:
                parsed = self.parse(text, tools)
            except (ValueError, KeyError, TypeError, IndexError, AttributeError) as e:
                log.info("tool call text did not parse (%s): %r", type(e).__name__, text[:200])
                continue
            for call in parsed if isinstance(parsed, list) else [parsed]:
                if not isinstance(call, dict) or "name" not in call:
                    continue
                args = call.get("arguments", {})
                out.append({
                    "id": call.get("id") or f"call_{secrets.token_hex(12)}",
                    "type": "function",
                    "function": {"name": str(call["name"]),
                                 "arguments": args if isinstance(args, str) else
                                 json.dumps(args, ensure_ascii=False)},
                })
        return out


@dataclass
class ToolSplitter:
    """Separates generated text into content and tool-call texts as it arrives (streamed
    deltas or the whole text at once). Text that may be the beginning of a start marker is
    held back until it is known not to be."""

    parser: ToolParser
    _buffer: str = ""
    _in_call: bool = False
    _call: str = ""
    made_call: bool = False
    _done_calls: list = field(default_factory=list)

    def push(self, text: str) -> tuple[str, list[str]]:
        """(content that is final now, tool-call texts completed now)."""
        self._buffer += text
        content, calls = [], []
        p = self.parser
        while self._buffer:
            if self._in_call:
                at = self._buffer.find(p.end)
                if at < 0:
                    self._call += self._buffer
                    self._buffer = ""
                    break
                self._call += self._buffer[:at]
                self._buffer = self._buffer[at + len(p.end):]
                calls.append(self._call)
                self._call, self._in_call, self.made_call = "", False, True
                continue
            at = self._buffer.find(p.start)
            if at >= 0:
                content.append(self._buffer[:at])
                self._buffer = self._buffer[at + len(p.start):]
                self._in_call = True
                continue
            keep = _partial_suffix(self._buffer, p.start)
            content.append(self._buffer[:len(self._buffer) - keep])
            self._buffer = self._buffer[len(self._buffer) - keep:]
            break
        return "".join(content), calls

    def finish(self) -> tuple[str, list[str]]:
        """What is left: held-back text as content, an unterminated call as a call text."""
        if self._in_call:
            call, self._call, self._in_call = self._call + self._buffer, "", False
            self._buffer = ""
            self.made_call = True
            return "", [call]
        rest, self._buffer = self._buffer, ""
        return rest, []


def _partial_suffix(text: str, marker: str) -> int:
    """Length of the longest end of `text` that is a proper beginning of `marker`."""
    for n in range(min(len(text), len(marker) - 1), 0, -1):
        if marker.startswith(text[-n:]):
            return n
    return 0
