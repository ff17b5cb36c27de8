"""Binary codec for the messages of `mlxsup.ipc.messages`.

Every message is `u8 version, u8 type` followed by fixed fields (little-endian struct) and
variable parts: arrays as `u32 count` + packed items (`array('i')` token ids, `array('f')`
log-probs, `array('I')` policy versions), strings as `u32 length` + UTF-8. Decoded sequences
are Python lists (what orjson and mlx take directly); floats come back rounded to float32.

`decode` raises `CodecError` (a `ValueError`) for any malformed input and nothing else, so a
bad message can never take down the engine or a worker. `encode` raises `CodecError` for values
the format cannot carry (a token id beyond int32, an unknown finish reason, ...).
"""

from __future__ import annotations

import struct
from array import array

from mlxsup.ipc.messages import (
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

VERSION = 3  # 2: top log-probs, engine controls, the prefix cache's salt and cached tokens; 3: requests carry their tag (the client's request_id), AbortTagged

T_HELLO = 1
T_GENERATE = 2
T_SCORE = 3
T_ABORT = 4
T_ABORT_TAGGED = 6
T_TOKEN_CHUNK = 16
T_SEQUENCE_DONE = 17
T_SCORE_RESULT = 18
T_ERROR = 19
T_CONTROL = 5
T_CONTROL_RESULT = 20

for _code in "ifI":  # the wire format fixes 4-byte items
    if array(_code).itemsize != 4:
        raise ImportError(f"array('{_code}') is not 4 bytes on this platform")

_HEAD = struct.Struct("<BB")
_U32 = struct.Struct("<I")
_HELLO = struct.Struct("<IQI")  # slot, generation, pid
_GENERATE = struct.Struct("<QI?qd")  # request_id, n, stream, min_policy_version, min_policy_wait_s
_PARAMS = struct.Struct("<ddqddqqBqB")  # see _put_params
# Flag bits of the byte before the seed (bit 0 alone was a bool "has seed" at first).
_HAS_SEED, _IGNORE_EOS = 1, 2
_SCORE = struct.Struct("<QB")  # request_id, logprobs_mode
_ABORT = struct.Struct("<Q")
_CHUNK = struct.Struct("<QI")  # request_id, seq_index
# ..., finish_reason, prompt tokens, batch, version, 3 times, cached prompt tokens
_DONE = struct.Struct("<QIBIIqdddI")
_SCORE_RESULT = struct.Struct("<Qq")  # request_id, policy_version
_CONTROL = struct.Struct("<QBB")  # request_id, op, mode (index + 1; 0 none)
_CONTROL_RESULT = struct.Struct("<Q?BI")  # request_id, is_paused, mode (index + 1), num_aborted
_TOP = struct.Struct("<B")  # top_logprobs k


class CodecError(ValueError):
    """Bytes that are not a valid message, or a message the format cannot carry."""


# ---------------------------------------------------------------- encode


def encode(msg) -> bytes:
    """Serialise one request or event."""
    try:
        out: list = []
        kind = type(msg)
        if kind is Hello:
            out.append(_HEAD.pack(VERSION, T_HELLO) + _HELLO.pack(msg.slot, msg.generation, msg.pid))
        elif kind is GenerateRequest:
            out.append(_HEAD.pack(VERSION, T_GENERATE))
            out.append(
                _GENERATE.pack(
                    msg.request_id, msg.n, msg.stream, msg.min_policy_version, msg.min_policy_wait_s
                )
            )
            _put_params(out, msg.params)
            _put_array(out, "i", msg.prompt_ids)
            _put_str(out, msg.cache_salt)
            _put_str(out, msg.tag)
        elif kind is ScoreRequest:
            out.append(_HEAD.pack(VERSION, T_SCORE))
            out.append(_SCORE.pack(msg.request_id, _index(LOGPROBS_MODES, msg.logprobs_mode)))
            _put_params(out, msg.params)
            _put_array(out, "i", msg.prompt_ids)
            _put_array(out, "i", msg.completion_ids)
            out.append(_TOP.pack(msg.top_logprobs))
            _put_str(out, msg.cache_salt)
            _put_str(out, msg.tag)
        elif kind is AbortRequest:
            out.append(_HEAD.pack(VERSION, T_ABORT) + _ABORT.pack(msg.request_id))
        elif kind is AbortTagged:
            out.append(_HEAD.pack(VERSION, T_ABORT_TAGGED))
            _put_str(out, msg.tag)
        elif kind is TokenChunk:
            out.append(_HEAD.pack(VERSION, T_TOKEN_CHUNK) + _CHUNK.pack(msg.request_id, msg.seq_index))
            _put_tokens(out, msg.token_ids, msg.logprobs, msg.versions)
            _put_top(out, msg.top_ids, msg.top_logprobs)
        elif kind is SequenceDone:
            out.append(_HEAD.pack(VERSION, T_SEQUENCE_DONE))
            out.append(
                _DONE.pack(
                    msg.request_id,
                    msg.seq_index,
                    _index(FINISH_REASONS, msg.finish_reason),
                    msg.num_prompt_tokens,
                    msg.batch_size,
                    msg.policy_version,
                    msg.queue_ms,
                    msg.ttft_ms,
                    msg.total_ms,
                    msg.num_cached_tokens,
                )
            )
            _put_tokens(out, msg.token_ids, msg.logprobs, msg.versions)
            _put_top(out, msg.top_ids, msg.top_logprobs)
        elif kind is ScoreResult:
            out.append(_HEAD.pack(VERSION, T_SCORE_RESULT))
            out.append(_SCORE_RESULT.pack(msg.request_id, msg.policy_version))
            _put_array(out, "f", msg.logprobs)
            _put_top(out, msg.top_ids, msg.top_logprobs)
        elif kind is EngineControl:
            out.append(_HEAD.pack(VERSION, T_CONTROL) + _CONTROL.pack(
                msg.request_id, _index(CONTROL_OPS, msg.op),
                _index(PAUSE_MODES, msg.mode) + 1 if msg.mode else 0))
        elif kind is ControlResult:
            out.append(_HEAD.pack(VERSION, T_CONTROL_RESULT) + _CONTROL_RESULT.pack(
                msg.request_id, msg.is_paused,
                _index(PAUSE_MODES, msg.mode) + 1 if msg.mode else 0, msg.num_aborted))
        elif kind is ErrorEvent:
            out.append(_HEAD.pack(VERSION, T_ERROR) + _ABORT.pack(msg.request_id))
            for text in (msg.code, msg.message, msg.field):
                _put_str(out, text)
        else:
            raise CodecError(f"cannot encode {kind.__name__}")
        return b"".join(out)
    except CodecError:
        raise
    except (struct.error, OverflowError, TypeError, ValueError, AttributeError) as e:
        raise CodecError(f"cannot encode {type(msg).__name__}: {e}") from None


def _index(choices: tuple, value) -> int:
    try:
        return choices.index(value)
    except ValueError:
        raise CodecError(f"{value!r} is not one of {choices}") from None


def _put_array(out: list, code: str, values) -> None:
    packed = values if isinstance(values, array) and values.typecode == code else array(code, values)
    out.append(_U32.pack(len(packed)))
    out.append(packed.tobytes())


def _put_tokens(out: list, token_ids, logprobs, versions) -> None:
    _put_array(out, "i", token_ids)
    _put_array(out, "f", logprobs)
    _put_array(out, "I", versions)


def _put_top(out: list, top_ids, top_logprobs) -> None:
    if len(top_ids) != len(top_logprobs):
        raise CodecError("top_ids and top_logprobs differ in length")
    _put_array(out, "i", top_ids)
    _put_array(out, "f", top_logprobs)


def _put_str(out: list, text: str) -> None:
    data = text.encode("utf-8")
    out.append(_U32.pack(len(data)) + data)


def _put_params(out: list, p: SamplingParams) -> None:
    out.append(
        _PARAMS.pack(
            p.temperature,
            p.top_p,
            p.top_k,
            p.min_p,
            p.repetition_penalty,
            p.repetition_context_size,
            p.max_tokens,
            (_HAS_SEED if p.seed is not None else 0) | (_IGNORE_EOS if p.ignore_eos else 0),
            0 if p.seed is None else p.seed,
            _index(LOGPROBS_MODES, p.logprobs_mode),
        )
    )
    _put_array(out, "i", p.stop_token_ids)
    out.append(_U32.pack(len(p.stop_strings)))
    for s in p.stop_strings:
        _put_str(out, s)
    out.append(_TOP.pack(p.top_logprobs))


# ---------------------------------------------------------------- decode


class _Reader:
    """Bounds-checked cursor over the message bytes."""

    __slots__ = ("view", "pos")

    def __init__(self, data):
        self.view = memoryview(data).cast("B")
        self.pos = 0

    def take(self, n: int) -> memoryview:
        end = self.pos + n
        if end > len(self.view):
            raise CodecError(f"truncated message: need {end} bytes, have {len(self.view)}")
        chunk = self.view[self.pos : end]
        self.pos = end
        return chunk

    def unpack(self, st: struct.Struct) -> tuple:
        return st.unpack(self.take(st.size))

    def array(self, code: str) -> list:
        (count,) = self.unpack(_U32)
        values = array(code)
        values.frombytes(self.take(count * 4))
        return values.tolist()

    def str(self) -> str:
        (count,) = self.unpack(_U32)
        try:
            return str(self.take(count), "utf-8")
        except UnicodeDecodeError as e:
            raise CodecError(f"invalid UTF-8 in a string field: {e}") from None


def decode(data):
    """Parse bytes made by `encode`; raises `CodecError` on anything else."""
    try:
        r = _Reader(data)
    except TypeError:
        raise CodecError("decode() needs a bytes-like object") from None
    try:
        version, kind = r.unpack(_HEAD)
        if version != VERSION:
            raise CodecError(f"unsupported codec version {version} (this side speaks {VERSION})")
        decoder = _DECODERS.get(kind)
        if decoder is None:
            raise CodecError(f"unknown message type {kind}")
        msg = decoder(r)
        if r.pos != len(r.view):
            raise CodecError(f"{len(r.view) - r.pos} trailing bytes after {type(msg).__name__}")
        return msg
    except CodecError:
        raise
    except (ValueError, TypeError, OverflowError, struct.error) as e:
        # field values the message types reject (n=0, top_p=nan, ...)
        raise CodecError(f"invalid message: {e}") from None


def _choice(choices: tuple, index: int) -> str:
    if index >= len(choices):
        raise CodecError(f"enum index {index} out of range for {choices}")
    return choices[index]


def _get_params(r: _Reader) -> SamplingParams:
    (temperature, top_p, top_k, min_p, rep_penalty, rep_context, max_tokens, flags, seed, mode) = (
        r.unpack(_PARAMS)
    )
    if flags & ~(_HAS_SEED | _IGNORE_EOS):
        raise CodecError(f"unknown sampling flags {flags:#x}")
    stop_token_ids = tuple(r.array("i"))
    (num_strings,) = r.unpack(_U32)
    if num_strings > len(r.view) - r.pos:  # each string takes at least 4 bytes
        raise CodecError("stop string count exceeds the message size")
    stop_strings = tuple(r.str() for _ in range(num_strings))
    (top_logprobs,) = r.unpack(_TOP)
    return SamplingParams(
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        min_p=min_p,
        repetition_penalty=rep_penalty,
        repetition_context_size=rep_context,
        max_tokens=max_tokens,
        seed=seed if flags & _HAS_SEED else None,
        logprobs_mode=_choice(LOGPROBS_MODES, mode),
        stop_token_ids=stop_token_ids,
        stop_strings=stop_strings,
        ignore_eos=bool(flags & _IGNORE_EOS),
        top_logprobs=top_logprobs,
    )


def _get_hello(r: _Reader) -> Hello:
    slot, generation, pid = r.unpack(_HELLO)
    return Hello(slot=slot, generation=generation, pid=pid)


def _get_generate(r: _Reader) -> GenerateRequest:
    request_id, n, stream, min_version, min_wait = r.unpack(_GENERATE)
    params = _get_params(r)
    return GenerateRequest(
        request_id=request_id,
        prompt_ids=r.array("i"),
        params=params,
        n=n,
        stream=stream,
        min_policy_version=min_version,
        min_policy_wait_s=min_wait,
        cache_salt=r.str(),
        tag=r.str(),
    )


def _get_score(r: _Reader) -> ScoreRequest:
    request_id, mode = r.unpack(_SCORE)
    params = _get_params(r)
    prompt_ids = r.array("i")
    completion_ids = r.array("i")
    (top_logprobs,) = r.unpack(_TOP)
    return ScoreRequest(
        request_id=request_id,
        prompt_ids=prompt_ids,
        completion_ids=completion_ids,
        logprobs_mode=_choice(LOGPROBS_MODES, mode),
        params=params,
        top_logprobs=top_logprobs,
        cache_salt=r.str(),
        tag=r.str(),
    )


def _get_abort(r: _Reader) -> AbortRequest:
    (request_id,) = r.unpack(_ABORT)
    return AbortRequest(request_id=request_id)


def _get_abort_tagged(r: _Reader) -> AbortTagged:
    return AbortTagged(tag=r.str())


def _get_token_chunk(r: _Reader) -> TokenChunk:
    request_id, seq_index = r.unpack(_CHUNK)
    tokens, logprobs, versions = r.array("i"), r.array("f"), r.array("I")
    top_ids, top_lps = _get_top(r)
    return TokenChunk(request_id, seq_index, tokens, logprobs, versions, top_ids, top_lps)


def _get_top(r: _Reader) -> tuple[list, list]:
    top_ids, top_lps = r.array("i"), r.array("f")
    if len(top_ids) != len(top_lps):
        raise CodecError("top_ids and top_logprobs differ in length")
    return top_ids, top_lps


def _get_sequence_done(r: _Reader) -> SequenceDone:
    (request_id, seq_index, reason, num_prompt, batch, version, queue_ms, ttft_ms, total_ms,
     num_cached) = r.unpack(_DONE)
    token_ids, logprobs, versions = r.array("i"), r.array("f"), r.array("I")
    top_ids, top_lps = _get_top(r)
    return SequenceDone(
        request_id=request_id,
        seq_index=seq_index,
        finish_reason=_choice(FINISH_REASONS, reason),
        token_ids=token_ids,
        logprobs=logprobs,
        versions=versions,
        top_ids=top_ids,
        top_logprobs=top_lps,
        num_prompt_tokens=num_prompt,
        batch_size=batch,
        policy_version=version,
        queue_ms=queue_ms,
        ttft_ms=ttft_ms,
        total_ms=total_ms,
        num_cached_tokens=num_cached,
    )


def _get_score_result(r: _Reader) -> ScoreResult:
    request_id, version = r.unpack(_SCORE_RESULT)
    logprobs = r.array("f")
    top_ids, top_lps = _get_top(r)
    return ScoreResult(request_id=request_id, logprobs=logprobs, policy_version=version,
                       top_ids=top_ids, top_logprobs=top_lps)


def _get_control(r: _Reader) -> EngineControl:
    request_id, op, mode = r.unpack(_CONTROL)
    return EngineControl(request_id, _choice(CONTROL_OPS, op),
                         _choice(PAUSE_MODES, mode - 1) if mode else "")


def _get_control_result(r: _Reader) -> ControlResult:
    request_id, is_paused, mode, num_aborted = r.unpack(_CONTROL_RESULT)
    return ControlResult(request_id, is_paused, _choice(PAUSE_MODES, mode - 1) if mode else "",
                         num_aborted)


def _get_error(r: _Reader) -> ErrorEvent:
    (request_id,) = r.unpack(_ABORT)
    return ErrorEvent(request_id=request_id, code=r.str(), message=r.str(), field=r.str())


_DECODERS = {
    T_HELLO: _get_hello,
    T_GENERATE: _get_generate,
    T_SCORE: _get_score,
    T_ABORT: _get_abort,
    T_ABORT_TAGGED: _get_abort_tagged,
    T_TOKEN_CHUNK: _get_token_chunk,
    T_SEQUENCE_DONE: _get_sequence_done,
    T_SCORE_RESULT: _get_score_result,
    T_ERROR: _get_error,
    T_CONTROL: _get_control,
    T_CONTROL_RESULT: _get_control_result,
}
