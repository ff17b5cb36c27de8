"""A tiny model that calls a tool: the demo tokenizer with tool-call tokens and a chat template
that renders `tools` (mlx-lm infers its `json_tools` parser from it), and weights made so that
greedy decoding after the generation prompt writes one tool call and stops.

The weights are the tiny demo model's with every layer's output projections zeroed, so the
last hidden state is the (normalised) embedding of the current token; the output projection
then maps the generation prompt's last token to `<tool_call>`, that to the call's JSON (one
added token), that to `</tool_call>` and that to the end-of-turn token. Nothing else is
likely, so the call is the model's answer at any temperature up to about 1.
"""

from __future__ import annotations

import json
import os

import numpy as np

from mlxsup.demo import EOT, build_demo_model, save_safetensors

TOOL_START, TOOL_END = "<tool_call>", "</tool_call>"
CALL = {"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}
CALL_TEXT = json.dumps(CALL)

TOOL_TEMPLATE = (
    "{% if tools %}<|start|>system\nYou may call these tools:\n"
    "{% for tool in tools %}{{ tool.function.name }}: {{ tool.function.description }}\n{% endfor %}"
    'Answer a call as <tool_call>{"name": ..., "arguments": ...}</tool_call><|eot|>\n{% endif %}'
    "{% for message in messages %}<|start|>{{ message['role'] }}\n"
    "{% if message.tool_calls %}{% for tool_call in message.tool_calls %}"
    "{% set tool_call = tool_call.function %}"
    '<tool_call>{"name": "{{ tool_call.name }}", "arguments": {{ tool_call.arguments }}}</tool_call>'
    "{% endfor %}{% else %}{{ message['content'] }}{% endif %}<|eot|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|start|>assistant\n{% endif %}"
)


def build_tool_model(out_dir: str) -> str:
    from tokenizers import AddedToken, Tokenizer

    build_demo_model(out_dir, seed=0, preset="tiny")
    tok = Tokenizer.from_file(os.path.join(out_dir, "tokenizer.json"))
    tok.add_tokens([AddedToken(t, normalized=False) for t in (TOOL_START, CALL_TEXT, TOOL_END)])
    tok.save(os.path.join(out_dir, "tokenizer.json"))
    vocab = tok.get_vocab_size()
    chain = [tok.encode("<|start|>assistant\n", add_special_tokens=False).ids[-1],
             tok.token_to_id(TOOL_START), tok.token_to_id(CALL_TEXT), tok.token_to_id(TOOL_END),
             tok.token_to_id(EOT)]

    with open(os.path.join(out_dir, "config.json")) as f:
        config = json.load(f)
    config.update(vocab_size=vocab, tie_word_embeddings=False)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    path = os.path.join(out_dir, "tokenizer_config.json")
    with open(path) as f:
        tok_config = json.load(f)
    tok_config["chat_template"] = TOOL_TEMPLATE
    with open(path, "w") as f:
        json.dump(tok_config, f, indent=2)

    rng = np.random.default_rng(0)
    h, layers, f_dim = config["hidden_size"], config["num_hidden_layers"], config["intermediate_size"]
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    kv = kv_heads * (h // heads)
    embed = (rng.standard_normal((vocab, h)) * 0.1).astype(np.float32)
    # the chain's tokens get orthogonal embeddings, so each maps to its successor alone
    q, _ = np.linalg.qr(rng.standard_normal((h, len(chain))))
    for i, t in enumerate(chain):
        embed[t] = q[:, i] * 0.1 * np.sqrt(h)
    w = {"model.embed_tokens.weight": embed, "model.norm.weight": np.ones(h, np.float32)}
    for i in range(layers):
        p = f"model.layers.{i}."
        w[p + "self_attn.q_proj.weight"] = np.eye(h, dtype=np.float32)
        w[p + "self_attn.k_proj.weight"] = np.zeros((kv, h), np.float32)
        w[p + "self_attn.v_proj.weight"] = np.zeros((kv, h), np.float32)
        w[p + "self_attn.o_proj.weight"] = np.zeros((h, h), np.float32)
        w[p + "mlp.gate_proj.weight"] = np.zeros((f_dim, h), np.float32)
        w[p + "mlp.up_proj.weight"] = np.zeros((f_dim, h), np.float32)
        w[p + "mlp.down_proj.weight"] = np.zeros((h, f_dim), np.float32)
        w[p + "input_layernorm.weight"] = np.ones(h, np.float32)
        w[p + "post_attention_layernorm.weight"] = np.ones(h, np.float32)
    head = np.zeros((vocab, h), np.float32)
    for a, b in zip(chain, chain[1:]):
        x = embed[a] / np.sqrt(np.mean(embed[a] ** 2) + 1e-5)  # what the final norm gives
        head[b] = 30.0 * x / np.dot(x, x)
    w["lm_head.weight"] = head
    save_safetensors(os.path.join(out_dir, "model.safetensors"), w)
    return out_dir
