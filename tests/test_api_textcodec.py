"""The worker's tokenizer side: model resolution (never a download), incremental detokenizing
(characters split over tokens come out whole), stop strings held back and cut."""

from __future__ import annotations

import pytest

from mlxsup.api import textcodec
from mlxsup.api.textcodec import TextCodec, cut_at_stop, resolve_model_dir


@pytest.fixture(scope="module")
def codec(tiny_model_dir):
    return TextCodec.load(tiny_model_dir)


def test_model_resolution(tmp_path, monkeypatch):
    assert resolve_model_dir(str(tmp_path)) == str(tmp_path)
    calls = []

    def fake_snapshot_download(repo_id, **kw):
        calls.append((repo_id, kw))
        return "/snapshots/abc"

    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    assert resolve_model_dir("mlx-community/Some-Model-4bit") == "/snapshots/abc"
    assert calls == [("mlx-community/Some-Model-4bit", {"local_files_only": True})]
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


@pytest.mark.parametrize("text", ["What is machine learning? It is 1 + 2 = 3.", "héllo wörld ünïcode 日本語 😀 ok",
                                  "   spaced   out  ", "a\nb\n\nc"])
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


def test_chat_template_errors_are_422(codec, monkeypatch):
    from mlxsup.api.errors import ApiError

    monkeypatch.setattr(codec.tokenizer, "chat_template", "{{ raise_exception('roles must alternate') }}")
    with pytest.raises(ApiError) as e:
        codec.encode_chat([{"role": "user", "content": "x"}], "messages[1]")
    assert e.value.status == 422 and e.value.field == "messages[1]" and "roles must alternate" in e.value.message
    monkeypatch.setattr(codec.tokenizer, "chat_template", None)
    with pytest.raises(ApiError) as e:
        codec.encode_chat([{"role": "user", "content": "x"}])
    assert e.value.status == 422 and "no chat template" in e.value.message
