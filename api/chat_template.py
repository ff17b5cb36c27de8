"""Chat templates, found and rendered as transformers' `apply_chat_template` does, with jinja2
alone (importing transformers costs an API worker hundreds of MiB where torch is installed).

Where a template comes from, first match wins: `chat_template.jinja` (plus named templates in
`additional_chat_templates/*.jinja`), the legacy processor file `chat_template.json`, then the
`chat_template` key of `tokenizer_config.json` (a string, or a list of `{name, template}`).

How it renders (transformers' `chat_template_utils`, read for each point): an
`ImmutableSandboxedEnvironment` (templates come from model repositories: untrusted) with
`trim_blocks` and `lstrip_blocks`, the `loopcontrols` extension, a `tojson` that keeps
non-ASCII and does not HTML-escape, the globals `raise_exception` and `strftime_now`, a `dict`
and a `namespace` that cannot reach Python internals, `{% generation %}` blocks rendered as
their body; the template sees `messages`, `tools`, `documents`, `add_generation_prompt` and the
tokenizer's named special tokens (`bos_token`, `eos_token`, ...) as strings. Keys whose value
is None are dropped from messages, and a message's reasoning is copied under the names
templates read it by.
"""

from __future__ import annotations

import functools
import json
import os
from datetime import datetime
from typing import Optional, Sequence, Union

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.utils
from jinja2.sandbox import ImmutableSandboxedEnvironment

Template = Union[str, dict]  # one template, or named templates ("default", "tool_use", ...)

# transformers' SPECIAL_TOKENS_ATTRIBUTES: what a template may refer to by name.
NAMED_SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token",
                        "mask_token")
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


class ChatTemplateError(ValueError):
    """The template refused the messages (raise_exception, a jinja error, a missing template)."""


def find_chat_template(model_dir: str, tokenizer_config: dict) -> Optional[Template]:
    """The model's chat template(s), looked up as transformers' tokenizer and processor loaders
    do; None when the model has none."""
    templates = {}
    extra_dir = os.path.join(model_dir, "additional_chat_templates")
    if os.path.isdir(extra_dir):
        for name in sorted(os.listdir(extra_dir)):
            if name.endswith(".jinja"):
                templates[name[: -len(".jinja")]] = _read_text(os.path.join(extra_dir, name))
    jinja_file = os.path.join(model_dir, "chat_template.jinja")
    json_file = os.path.join(model_dir, "chat_template.json")
    if os.path.isfile(jinja_file):
        templates["default"] = _read_text(jinja_file)
    elif os.path.isfile(json_file) and not templates:
        with open(json_file, encoding="utf-8") as f:
            value = json.load(f).get("chat_template")
        if value:
            templates["default"] = value
    if not templates:
        value = tokenizer_config.get("chat_template")
        if isinstance(value, list):  # [{"name": ..., "template": ...}]
            return {t["name"]: t["template"] for t in value} or None
        return value or None
    if list(templates) == ["default"]:
        return templates["default"]
    return templates


def pick_template(template: Template, has_tools: bool) -> str:
    """transformers' `get_chat_template`: of named templates, "tool_use" when tools are given
    and there is one, else "default"."""
    if isinstance(template, str):
        return template
    if has_tools and "tool_use" in template:
        return template["tool_use"]
    if "default" in template:
        return template["default"]
    raise ChatTemplateError(f"the model has several chat templates and none named default: {sorted(template)}")


def render(template: str, messages: Sequence[dict], *, special_tokens: dict, tools: Optional[list] = None,
           documents: Optional[list] = None, add_generation_prompt: bool = True) -> str:
    """The conversation as text, as `tokenizer.apply_chat_template(messages, tools=tools,
    tokenize=False, add_generation_prompt=...)` renders it. Raises ChatTemplateError."""
    chat = []
    for message in messages:
        message = {k: v for k, v in message.items() if v is not None}
        reasoning = next((message[k] for k in _REASONING_FIELDS if message.get(k) is not None), None)
        if reasoning is not None:
            message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
        chat.append(message)
    try:
        compiled = _compile(template)
        return compiled.render(messages=chat, tools=tools, documents=documents,
                               add_generation_prompt=add_generation_prompt, **special_tokens)
    except ChatTemplateError:
        raise
    except Exception as e:  # jinja raises whatever the template author chose, or a TypeError of theirs
        raise ChatTemplateError(f"{type(e).__name__}: {e}") from None


class _GenerationBlocks(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` (transformers marks the assistant's tokens with
    it); rendered as its body, the mask is not needed here."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller):
        return caller()


class _TemplateNamespace(jinja2.utils.Namespace):
    """jinja's `namespace()`, refusing underscore attributes (a way to CPython internals)."""

    def __init__(*args, **kwargs):  # jinja's own signature trick, so namespace(self=...) works
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _TemplateNamespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name, value):
        _TemplateNamespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name):
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"chat templates cannot set {name!r} on a namespace")


class _TemplateDict:
    """`dict(...)` and `dict.fromkeys(...)` for templates, without the type itself."""

    def __call__(self, *args, **kwargs):
        return dict(*args, **kwargs)

    def fromkeys(self, *args, **kwargs):
        return dict.fromkeys(*args, **kwargs)


def _raise_exception(message):
    raise ChatTemplateError(str(message))


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt):
    return datetime.now().strftime(fmt)


@functools.lru_cache(maxsize=16)
def _compile(template: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_GenerationBlocks, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now, dict=_TemplateDict(),
                       namespace=_TemplateNamespace)
    return env.from_string(template)


def _read_text(path: str) -> str:
    with open(path, encoding="utf-8") as f:
        return f.read()
