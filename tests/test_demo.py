"""The built-in demo model loads with mlx-lm and transformers, and is deterministic."""

import filecmp
import os
import subprocess
import sys

import pytest

from mlxsup.demo import EOT, build_demo_model, ensure_demo_model


def test_loads_and_generates_with_mlx_lm(tiny_model_dir):
    import mlx_lm

    model, tok = mlx_lm.load(tiny_model_dir)
    ids = tok.encode("What is reinforcement learning?")
    out = mlx_lm.generate(model, tok, ids, max_tokens=8)
    assert isinstance(out, str)
    # The tokenizer's end-of-turn token is the model's EOS, so generation can stop on it.
    assert tok.eos_token_ids == {tok.convert_tokens_to_ids(EOT)}


def test_tokenizer_round_trips_text_and_chat_template(tiny_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    text = "Hello, world! 12 + 30 = 42 — ünïcödé too."
    ids = tok.encode(text)
    assert ids[0] == tok.bos_token_id
    assert tok.decode(ids, skip_special_tokens=True) == text
    chat = tok.apply_chat_template(
        [{"role": "user", "content": "What is 2 + 2?"}], add_generation_prompt=True, tokenize=False
    )
    assert chat == "<|start|>user\nWhat is 2 + 2?<|eot|>\n<|start|>assistant\n"
    chat_ids = tok.encode(chat, add_special_tokens=False)
    assert tok.eos_token_id in chat_ids
    assert tok.decode(chat_ids) == chat


def test_same_seed_same_files_other_seed_other_weights(tmp_path):
    a = build_demo_model(str(tmp_path / "a"), seed=3, preset="tiny")
    b = build_demo_model(str(tmp_path / "b"), seed=3, preset="tiny")
    c = build_demo_model(str(tmp_path / "c"), seed=4, preset="tiny")
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert filecmp.cmp(os.path.join(a, name), os.path.join(b, name), shallow=False)
    assert not filecmp.cmp(os.path.join(a, "model.safetensors"), os.path.join(c, "model.safetensors"), shallow=False)


def test_ensure_builds_once_and_reuses(tmp_path):
    path = str(tmp_path / "cache" / "demo")
    assert ensure_demo_model(path, preset="tiny") == path
    mtime = os.path.getmtime(os.path.join(path, "model.safetensors"))
    assert ensure_demo_model(path, preset="tiny") == path
    assert os.path.getmtime(os.path.join(path, "model.safetensors")) == mtime
    assert [n for n in os.listdir(tmp_path / "cache") if n.startswith(".demo-")] == []


def test_cli_writes_demo_model(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "mlxsup", "demo-model", str(tmp_path / "m"), "--preset", "tiny"],
        capture_output=True, text=True, timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == str(tmp_path / "m")
    assert os.path.exists(tmp_path / "m" / "model.safetensors")


def test_unknown_preset_is_refused(tmp_path):
    with pytest.raises(ValueError, match="unknown preset"):
        build_demo_model(str(tmp_path), preset="huge")
