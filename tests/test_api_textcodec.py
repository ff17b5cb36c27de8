"""The worker's tokenizer side: model resolution (a cached snapshot first, never the weights),
the same ids, text and chat renderings as transformers (a test dependency only) for the test
models' tokenizers, chat templates found and sandboxed as transformers does, incremental
detokenizing (characters split over tokens come out whole), stop strings held back and cut."""

from __future__ import annotations

import json
import os
import shutil

import pytest

from mlxsup.api import textcodec
from mlxsup.api.errors import ApiError
from mlxsup.api.textcodec import TextCodec, cut_at_stop, resolve_model_dir

transformers = pytest.importorskip("transformers")

PROMPTS = ["What is machine learning? It is 1 + 2 = 3.", "héllo wörld ünïcode 日本語 😀 ok", "   spaced   out  ",
           "a\nb\n\nc\t", "<|eot|> special tokens written <|start|>as text<|bos|>", "x", "don't . , ? !",
           "alpha beta gamma " * 200]

TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city, in °C",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "e.g. Zürich"}},
                   "required": ["city"]}}}]

CONVERSATIONS = [
    [{"role": "user", "content": "hi"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 + 2?"},
     {"role": "assistant", "content": "4"}, {"role": "user", "content": "And 3 + 3? ünï 😀"}],
    [{"role": "system", "content": "You check the weather."}, {"role": "user", "content": "Weather in Zürich?"},
     {"role": "assistant", "content": "",
      "tool_calls": [{"id": "call_1", "type": "function",
                      "function": {"name": "get_weather", "arguments": {"city": "Zürich"}}}]},
     {"role": "tool", "tool_call_id": "call_1", "content": '{"temp_c": 21}'},
     {"role": "assistant", "content": "It is 21 °C."}, {"role": "user", "content": "Thanks"}],
]

# A tool-calling template in the shape of Qwen's: tools as JSON, namespace, loop controls,
# raise_exception, whitespace control.
TOOL_TEMPLATE = """
{%- if tools %}
{{- '<|start|>system\\n' }}
{%- if messages[0].role == 'system' %}{{- messages[0].content + '\\n\\n' }}{%- endif %}
{{- '# Tools\\n<tools>' }}
{%- for tool in tools %}{{- '\\n' }}{{- tool | tojson }}{%- endfor %}
{{- '\\n</tools><|eot|>\\n' }}
{%- elif messages[0].role == 'system' %}
{{- '<|start|>system\\n' + messages[0].content + '<|eot|>\\n' }}
{%- endif %}
{%- set ns = namespace(users=0) %}
{%- for message in messages %}
  {%- if message.role == 'system' %}{%- continue %}{%- endif %}
  {%- if message.role == 'user' %}{%- set ns.users = ns.users + 1 %}{%- endif %}
  {%- if message.role == 'user' or (message.role == 'assistant' and not message.tool_calls) %}
    {{- '<|start|>' + message.role + '\\n' + message.content + '<|eot|>\\n' }}
  {%- elif message.role == 'assistant' %}
    {{- '<|start|>assistant' }}
    {%- if message.content %}{{- '\\n' + message.content }}{%- endif %}
    {%- for tool_call in message.tool_calls %}
      {%- if tool_call.function is defined %}{%- set tool_call = tool_call.function %}{%- endif %}
      {{- '\\n<tool_call>\\n{"name": "' + tool_call.name + '", "arguments": ' + (tool_call.arguments | tojson) + '}\\n</tool_call>' }}
    {%- endfor %}
    {{- '<|eot|>\\n' }}
  {%- elif message.role == 'tool' %}
    {{- '<|start|>tool\\n<tool_response>\\n' + message.content + '\\n</tool_response><|eot|>\\n' }}
  {%- else %}{{- raise_exception('unknown role ' + message.role) }}
  {%- endif %}
{%- endfor %}
{%- if ns.users == 0 %}{{- raise_exception('a conversation needs a user message') }}{%- endif %}
{%- if add_generation_prompt %}{{- '<|start|>assistant\\n' }}{%- endif %}
"""

# One in the shape of Llama's: bos_token, eos_token, strftime_now, trim_blocks/lstrip_blocks
# (block tags on their own lines), {% generation %}.
DATED_TEMPLATE = """{{ bos_token }}{% set today = strftime_now('%d %b %Y') %}
{% for message in messages %}
    {% if loop.first and message['role'] != 'system' %}
<|start|>system
Today is {{ today }}.<|eot|>
    {% endif %}
    {% if message['role'] == 'assistant' %}
<|start|>assistant
{% generation %}{{ message['content'] | trim }}{% endgeneration %}{{ eos_token }}
    {% else %}
<|start|>{{ message['role'] }}
{{ message['content'] | trim }}<|eot|>
    {% endif %}
{% endfor %}
{% if add_generation_prompt %}
<|start|>assistant
{% endif %}"""


@pytest.fixture(scope="module")
def codec(tiny_model_dir):
    return TextCodec.load(tiny_model_dir)


@pytest.fixture(params=["tiny", "demo"], scope="module")
def model_dir(request, tiny_model_dir, demo_model_dir):
    return tiny_model_dir if request.param == "tiny" else demo_model_dir


def variant(tmp_path, src, *, config_template=..., files=None):
    """A copy of `src`'s tokenizer files with another chat template in tokenizer_config.json
    (None: none) and extra files ({relative path: text})."""
    out = tmp_path / "model"
    out.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "config.json"):
        shutil.copy(os.path.join(src, name), out / name)
    if config_template is not ...:
        config = json.loads((out / "tokenizer_config.json").read_text())
        config.pop("chat_template", None)
        if config_template is not None:
            config["chat_template"] = config_template
        (out / "tokenizer_config.json").write_text(json.dumps(config))
    for rel, text in (files or {}).items():
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        (out / rel).write_text(text)
    return str(out)


def hf_chat(tok, messages, tools=None, **kw):
    text = tok.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=True, **kw)
    ids = tok.apply_chat_template(messages, tools=tools, add_generation_prompt=True, return_dict=False, **kw)
    return text, list(ids)


def test_encode_and_decode_equal_transformers(model_dir):
    ours, theirs = TextCodec.load(model_dir), transformers.AutoTokenizer.from_pretrained(model_dir)
    assert ours.vocab_size == len(theirs)
    for text in PROMPTS:
        ids = ours.encode(text)
        assert ids == theirs.encode(text, add_special_tokens=True)
        assert ours.decode(ids) == theirs.decode(ids, skip_special_tokens=True)
        assert [ours.token_text(t) for t in ids] == [theirs.decode([t], skip_special_tokens=False) for t in ids]
    every_id = list(range(ours.vocab_size))
    assert ours.decode(every_id) == theirs.decode(every_id, skip_special_tokens=True)


def test_truncation_and_padding_in_tokenizer_json_do_not_cut_prompts(tiny_model_dir, tmp_path):
    path = variant(tmp_path, tiny_model_dir)
    data = json.loads(open(os.path.join(path, "tokenizer.json")).read())
    data["truncation"] = {"direction": "Right", "max_length": 8, "strategy": "LongestFirst", "stride": 0}
    data["padding"] = {"strategy": {"Fixed": 64}, "direction": "Right", "pad_to_multiple_of": None, "pad_id": 0,
                       "pad_type_id": 0, "pad_token": "<|pad|>"}
    with open(os.path.join(path, "tokenizer.json"), "w") as f:
        json.dump(data, f)
    ours, theirs = TextCodec.load(path), transformers.AutoTokenizer.from_pretrained(path)
    text = PROMPTS[0]
    assert ours.encode(text) == theirs.encode(text) == TextCodec.load(tiny_model_dir).encode(text)
    assert len(ours.encode(text)) > 8


@pytest.mark.parametrize("tokenizer_class", ["LlamaTokenizer", "GPT2Tokenizer"])
def test_model_specific_tokenizer_classes_read_tokenizer_json_as_we_do(tiny_model_dir, tmp_path, tokenizer_class):
    # transformers picks a class by tokenizer_config's name; these take tokenizer.json as it
    # is. (Qwen2Tokenizer rebuilds the pre-tokenizer with Qwen's regex whatever the file
    # says, so it differs on this made-up tokenizer; on Qwen's own files the two agree.)
    path = variant(tmp_path, tiny_model_dir)
    config = json.loads(open(os.path.join(path, "tokenizer_config.json")).read())
    config["tokenizer_class"] = tokenizer_class
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump(config, f)
    ours, theirs = TextCodec.load(path), transformers.AutoTokenizer.from_pretrained(path)
    for text in PROMPTS:
        ids = ours.encode(text)
        assert ids == theirs.encode(text) and ours.decode(ids) == theirs.decode(ids, skip_special_tokens=True)
    assert ours.encode_chat(CONVERSATIONS[1]) == hf_chat(theirs, CONVERSATIONS[1])[1]


@pytest.mark.parametrize("template", ["model's own", TOOL_TEMPLATE, DATED_TEMPLATE])
def test_chat_templates_render_as_transformers_does(model_dir, tmp_path, template):
    path = model_dir if template == "model's own" else variant(tmp_path, model_dir, config_template=template)
    ours, theirs = TextCodec.load(path), transformers.AutoTokenizer.from_pretrained(path)
    for messages in CONVERSATIONS:
        for tools in (None, TOOLS):
            text, ids = hf_chat(theirs, messages, tools)
            assert ours.render_chat(messages, tools=tools) == text
            assert ours.encode_chat(messages, tools=tools) == ids
    if template == TOOL_TEMPLATE:
        assert '"description": "Weather in a city, in °C"' in ours.render_chat(CONVERSATIONS[0], tools=TOOLS)


def test_template_files_take_priority_as_in_transformers(tiny_model_dir, tmp_path):
    # chat_template.jinja over the config's key; additional_chat_templates/tool_use.jinja with tools
    path = variant(tmp_path, tiny_model_dir, files={
        "chat_template.jinja": DATED_TEMPLATE, "additional_chat_templates/tool_use.jinja": TOOL_TEMPLATE})
    ours, theirs = TextCodec.load(path), transformers.AutoTokenizer.from_pretrained(path)
    messages = CONVERSATIONS[1]
    assert ours.render_chat(messages) == hf_chat(theirs, messages)[0]
    assert ours.render_chat(messages, tools=TOOLS) == hf_chat(theirs, messages, TOOLS)[0]
    assert ours.render_chat(messages).startswith("<|bos|><|start|>system")
    assert ours.render_chat(messages, tools=TOOLS).startswith("<|start|>system\nBe brief.\n\n# Tools")
    # the processors' legacy chat_template.json, where no .jinja file is
    (tmp_path / "j").mkdir()
    path = variant(tmp_path / "j", tiny_model_dir, config_template=None,
                   files={"chat_template.json": json.dumps({"chat_template": TOOL_TEMPLATE})})
    theirs = transformers.AutoTokenizer.from_pretrained(tiny_model_dir)
    assert (TextCodec.load(path).render_chat(messages, tools=TOOLS)
            == hf_chat(theirs, messages, TOOLS, chat_template=TOOL_TEMPLATE)[0])


@pytest.mark.parametrize("template, says", [
    (TOOL_TEMPLATE, "unknown role narrator"),
    ("{{ ''.__class__.__mro__ }}", "SecurityError"),  # no way out of the sandbox
    ("{% set x = [] %}{{ x.append(1) }}", "SecurityError"),  # immutable: templates change nothing
    ("{% set ns = namespace(_x=1) %}", "cannot set '_x'"),
    ("{{ messages[0].content | nonexistent_filter }}", "TemplateAssertionError"),
])
def test_a_template_refusing_messages_is_a_422_naming_the_field(tiny_model_dir, tmp_path, template, says):
    codec = TextCodec.load(variant(tmp_path, tiny_model_dir, config_template=template))
    with pytest.raises(ApiError) as e:
        codec.encode_chat([{"role": "narrator", "content": "x"}, {"role": "user", "content": "y"}], "messages[1]")
    assert e.value.status == 422 and e.value.field == "messages[1]" and says in e.value.message


def test_no_chat_template_is_a_422(tiny_model_dir, tmp_path):
    codec = TextCodec.load(variant(tmp_path, tiny_model_dir, config_template=None))
    with pytest.raises(ApiError) as e:
        codec.encode_chat([{"role": "user", "content": "x"}])
    assert e.value.status == 422 and "no chat template" in e.value.message and e.value.field == "messages"


def test_model_resolution(tmp_path, monkeypatch):
    assert resolve_model_dir(str(tmp_path)) == str(tmp_path)
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    calls, cached = [], {"mlx-community/Cached-4bit"}

    def fake_snapshot_download(repo_id, **kw):
        calls.append((repo_id, kw))
        if kw.get("local_files_only") and repo_id not in cached:
            raise LocalEntryNotFoundError("not cached")
        return f"/snapshots/{repo_id}"

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    assert resolve_model_dir("mlx-community/Cached-4bit") == "/snapshots/mlx-community/Cached-4bit"
    assert calls == [("mlx-community/Cached-4bit", {"local_files_only": True})]
    calls.clear()
    assert resolve_model_dir("org/New") == "/snapshots/org/New"
    (_, first), (_, second) = calls
    assert first == {"local_files_only": True}
    assert not any(p.endswith((".safetensors", "*")) and p != "additional_chat_templates/*"
                   for p in second["allow_patterns"])  # tokenizer and config files, never the weights
    from mlxsup.demo import default_demo_dir

    assert resolve_model_dir(None) == default_demo_dir()


def test_context_length(tiny_model_dir, tmp_path):
    assert textcodec.context_length(tiny_model_dir) > 0
    assert textcodec.context_length(str(tmp_path)) is None
    (tmp_path / "config.json").write_text('{"text_config": {"max_position_embeddings": 333}}')
    assert textcodec.context_length(str(tmp_path)) == 333


def stream_all(codec, ids, stops=(), step=1):
    stream = codec.text_stream(stops)
    pieces = [stream.push(ids[i:i + step]) for i in range(0, len(ids), step)]
    pieces.append(stream.finish())
    return pieces


@pytest.mark.parametrize("text", PROMPTS[:4])
def test_streamed_text_equals_the_whole_decode(codec, text):
    ids = codec.encode(text, "x")[1:]
    for step in (1, 2, 5):
        pieces = stream_all(codec, ids, step=step)
        assert "".join(pieces) == codec.decode(ids)
        assert all("\ufffd" not in p for p in pieces) or "\ufffd" in codec.decode(ids)


def test_stop_strings_are_held_back_then_cut(codec):
    ids = codec.encode("alpha beta gamma delta", "x")[1:]
    pieces = stream_all(codec, ids, stops=[" gamma", "zz"])
    assert "".join(pieces) == "alpha beta"
    assert cut_at_stop("alpha beta gamma", [" gamma", "a b"]) == "alph"
    assert cut_at_stop("abc", []) == "abc"


def test_the_fake_codec_round_trips_any_text():
    from mlxsup.api.testing import fake_codec

    codec = fake_codec()
    for text in PROMPTS:
        ids = codec.encode(text)
        assert ids[0] == 1 and codec.decode(ids) == text.replace("<|eot|>", "").replace("<|start|>", "").replace(
            "<|bos|>", "")
    assert codec.render_chat([{"role": "user", "content": "hi"}]) == "<|start|>user\nhi<|eot|>\n<|start|>assistant\n"
