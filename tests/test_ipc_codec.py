"""The binary message codec: round trips, a frozen wire format, and fuzzing."""

from __future__ import annotations

import struct
from array import array

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_ipc_support import no_leaked_segments  # noqa: F401  (autouse fixture)

from mlxsup.ipc.codec import _DECODERS, VERSION, CodecError, decode, encode
from mlxsup.ipc.messages import (
    ERROR_CODES,
    FINISH_REASONS,
    LOGPROBS_MODES,
    CONTROL_OPS,
    PAUSE_MODES,
    AbortRequest,
    ControlResult,
    EngineControl,
    AbortTagged,
    ErrorEvent,
    GenerateRequest,
    Hello,
    SamplingParams,
    ScoreRequest,
    ScoreResult,
    SequenceDone,
    TokenChunk,
)

pytestmark = pytest.mark.timeout(120)

FUZZ = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def f32(values):
    return array("f", values).tolist()


PARAMS = SamplingParams(
    temperature=0.7, top_p=0.9, top_k=40, min_p=0.05, repetition_penalty=1.1, repetition_context_size=64,
    max_tokens=256, seed=1234, logprobs_mode="processed", stop_token_ids=(2, 13), stop_strings=("\n\n", "Ω"),
    top_logprobs=5,
)

EXAMPLES = [
    Hello(slot=3, generation=7, pid=4242),
    GenerateRequest(request_id=2**64 - 1, prompt_ids=[1, 2, 3], params=PARAMS, n=8, stream=True,
                    min_policy_version=5, min_policy_wait_s=2.5),
    GenerateRequest(request_id=1, prompt_ids=[0]),
    ScoreRequest(request_id=9, prompt_ids=[5, 6], completion_ids=[7], logprobs_mode="raw", params=PARAMS),
    AbortRequest(request_id=12),
    AbortTagged(tag="trainer-17"),
    GenerateRequest(request_id=13, prompt_ids=[1], tag="req-ü"),
    TokenChunk(request_id=5, seq_index=1, token_ids=[10, 11], logprobs=f32([-0.1, -2.5]), versions=[3, 4]),
    TokenChunk(request_id=5, seq_index=0, token_ids=[], logprobs=[], versions=[]),
    SequenceDone(request_id=5, seq_index=2, finish_reason="length", token_ids=[1], logprobs=f32([-1.0]),
                 versions=[0], num_prompt_tokens=3, batch_size=5, policy_version=0, queue_ms=1.5,
                 ttft_ms=2.5, total_ms=10.0),
    ScoreResult(request_id=77, logprobs=f32([-0.5, -0.25]), policy_version=2),
    ErrorEvent(request_id=8, code="invalid", message="prompt too long: 5000 > 4096 ✗", field="prompt"),
    ScoreRequest(request_id=9, prompt_ids=[5], completion_ids=[7, 8], top_logprobs=20),
    TokenChunk(request_id=5, seq_index=0, token_ids=[10], logprobs=f32([-0.1]), versions=[3],
               top_ids=[10, 4], top_logprobs=f32([-0.1, float("-inf")])),
    SequenceDone(request_id=5, seq_index=0, finish_reason="stop", token_ids=[1], logprobs=f32([-1.0]),
                 versions=[0], num_prompt_tokens=3, batch_size=1, policy_version=0,
                 top_ids=[1, 2], top_logprobs=f32([-1.0, -1.5])),
    ScoreResult(request_id=7, logprobs=f32([-0.5]), policy_version=2, top_ids=[3],
                top_logprobs=f32([-0.25])),
    EngineControl(request_id=3, op="pause", mode="keep"),
    EngineControl(request_id=3, op="abort_all"),
    ControlResult(request_id=3, is_paused=True, mode="wait", num_aborted=4),
    ControlResult(request_id=3, is_paused=False),
]


@pytest.mark.parametrize("msg", EXAMPLES, ids=lambda m: type(m).__name__)
def test_round_trip(msg):
    assert decode(encode(msg)) == msg


@pytest.mark.parametrize("seed", [None, 0, 2**63 - 1])
@pytest.mark.parametrize("ignore_eos", [False, True])
def test_sampling_flags_round_trip(seed, ignore_eos):
    params = SamplingParams(seed=seed, ignore_eos=ignore_eos)
    msg = GenerateRequest(request_id=3, prompt_ids=[1], params=params)
    assert decode(encode(msg)).params == params


def test_unknown_sampling_flags_are_refused():
    data = bytearray(encode(GenerateRequest(request_id=3, prompt_ids=[1],
                                            params=SamplingParams(seed=7))))
    flags_at = data.find(bytes([1]) + (7).to_bytes(8, "little"))  # has-seed flag, then the seed
    assert flags_at > 0
    data[flags_at] = 1 | 0x80
    with pytest.raises(CodecError, match="flags"):
        decode(bytes(data))


def test_packed_arrays_are_accepted_and_lists_come_back():
    chunk = TokenChunk(1, 0, array("i", [5, 6]), array("f", [-1.0, -2.0]), array("I", [1, 1]))
    out = decode(encode(chunk))
    assert out.token_ids == [5, 6] and out.logprobs == [-1.0, -2.0] and out.versions == [1, 1]


def test_token_ids_travel_packed_not_as_text():
    prompt = list(range(100_000))
    data = encode(GenerateRequest(request_id=1, prompt_ids=prompt))
    assert len(data) < 4 * len(prompt) + 200


# Golden bytes: a change here breaks every worker/engine pair of mixed versions; bump VERSION.
GOLDEN = {
    "hello": (Hello(slot=1, generation=2, pid=3), "030101000000020000000000000003000000"),
    "abort": (AbortRequest(request_id=258), "03040201000000000000"),
    "chunk": (
        TokenChunk(request_id=1, seq_index=0, token_ids=[7], logprobs=[-0.5], versions=[2]),
        "0310010000000000000000000000010000000700000001000000000000bf01000000020000000000000000000000",
    ),
    "error": (
        ErrorEvent(request_id=1, code="timeout", message="m", field=""),
        "031301000000000000000700000074696d656f7574010000006d00000000",
    ),
}


@pytest.mark.parametrize("name", sorted(GOLDEN))
def test_wire_format_is_frozen(name):
    msg, hex_bytes = GOLDEN[name]
    assert encode(msg).hex() == hex_bytes
    assert decode(bytes.fromhex(hex_bytes)) == msg


@pytest.mark.parametrize(
    "msg",
    [
        GenerateRequest(request_id=1, prompt_ids=[2**31]),  # beyond int32
        GenerateRequest(request_id=-1, prompt_ids=[1]),
        TokenChunk(1, 0, [1], [0.0], [-1]),  # negative version
        SequenceDone(1, 0, "exploded", [], [], [], 0, 0, 0),
        "not a message",
    ],
    ids=["token>int32", "negative id", "negative version", "unknown finish", "str"],
)
def test_unencodable_values_raise_codec_error(msg):
    with pytest.raises(CodecError):
        encode(msg)


@pytest.mark.parametrize(
    "data",
    [b"", b"\x01", b"\x02\x01", b"\x01\x63", bytes.fromhex("0204020100000000000000"), "text", None],
    ids=["empty", "short", "version", "type", "trailing", "str", "none"],
)
def test_malformed_bytes_raise_codec_error(data):
    with pytest.raises(CodecError):
        decode(data)


def test_decoded_values_are_validated():
    data = bytearray(encode(GenerateRequest(request_id=1, prompt_ids=[1], n=2)))
    struct.pack_into("<I", data, 2 + 8, 0)  # n = 0
    with pytest.raises(CodecError, match="n must be"):
        decode(bytes(data))


# ---------------------------------------------------------------- hypothesis

ints32 = st.integers(-(2**31), 2**31 - 1)
u32 = st.integers(0, 2**32 - 1)
u64 = st.integers(0, 2**64 - 1)
f32s = st.floats(width=32, allow_nan=False)
text = st.text(max_size=20)

params = st.builds(
    SamplingParams,
    temperature=st.floats(0, 10),
    top_p=st.floats(0.01, 1),
    top_k=st.integers(0, 1000),
    min_p=st.floats(0, 0.99),
    repetition_penalty=st.floats(0.1, 5),
    repetition_context_size=st.integers(1, 1000),
    max_tokens=st.integers(1, 10**6),
    seed=st.none() | st.integers(0, 2**63 - 1),
    logprobs_mode=st.sampled_from(LOGPROBS_MODES),
    stop_token_ids=st.lists(ints32, max_size=5).map(tuple),
    stop_strings=st.lists(text, max_size=3).map(tuple),
)
token_lists = st.lists(ints32, max_size=50)
messages = st.one_of(
    st.builds(Hello, slot=u32, generation=u64, pid=u32),
    st.builds(GenerateRequest, request_id=u64, prompt_ids=st.lists(ints32, min_size=1, max_size=50),
              params=params, n=st.integers(1, 64), stream=st.booleans(),
              min_policy_version=st.integers(-1, 2**62), min_policy_wait_s=st.floats(0, 100)),
    st.builds(ScoreRequest, request_id=u64, prompt_ids=token_lists, completion_ids=token_lists,
              logprobs_mode=st.sampled_from(LOGPROBS_MODES), params=params),
    st.builds(AbortRequest, request_id=u64),
    st.builds(TokenChunk, request_id=u64, seq_index=u32, token_ids=token_lists,
              logprobs=st.lists(f32s, max_size=50), versions=st.lists(u32, max_size=50)),
    st.builds(SequenceDone, request_id=u64, seq_index=u32, finish_reason=st.sampled_from(FINISH_REASONS),
              token_ids=token_lists, logprobs=st.lists(f32s, max_size=50), versions=st.lists(u32, max_size=50),
              num_prompt_tokens=u32, batch_size=u32, policy_version=st.integers(-1, 2**62),
              queue_ms=st.floats(0, 1e6), ttft_ms=st.floats(0, 1e6), total_ms=st.floats(0, 1e6)),
    st.builds(ScoreResult, request_id=u64, logprobs=st.lists(f32s, max_size=50),
              policy_version=st.integers(-1, 2**62)),
    st.builds(ErrorEvent, request_id=u64, code=st.sampled_from(ERROR_CODES), message=text, field=text),
    st.builds(EngineControl, request_id=u64, op=st.sampled_from(CONTROL_OPS),
              mode=st.sampled_from(PAUSE_MODES)),
    st.builds(ControlResult, request_id=u64, is_paused=st.booleans(),
              mode=st.sampled_from(("",) + PAUSE_MODES), num_aborted=u32),
)


@FUZZ
@given(messages)
def test_any_message_round_trips(msg):
    assert decode(encode(msg)) == msg


@FUZZ
@given(st.binary(max_size=300))
def test_random_bytes_never_raise_anything_but_codec_error(data):
    try:
        decode(data)
    except CodecError:
        pass


@FUZZ
@given(st.sampled_from(sorted(_DECODERS)), st.binary(max_size=300))
def test_random_bodies_of_every_type_never_raise_anything_but_codec_error(kind, body):
    try:
        decode(bytes([VERSION, kind]) + body)
    except CodecError:
        pass


@FUZZ
@given(messages, st.data())
def test_damaged_messages_never_raise_anything_but_codec_error(msg, data):
    raw = bytearray(encode(msg))
    for _ in range(data.draw(st.integers(1, 4))):
        op = data.draw(st.sampled_from(["flip", "truncate", "insert"]))
        pos = data.draw(st.integers(0, max(0, len(raw) - 1)))
        if op == "flip" and raw:
            raw[pos] ^= data.draw(st.integers(1, 255))
        elif op == "truncate":
            del raw[pos:]
        else:
            raw[pos:pos] = data.draw(st.binary(min_size=1, max_size=8))
    try:
        decode(bytes(raw))
    except CodecError:
        pass
