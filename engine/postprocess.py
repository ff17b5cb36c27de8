"""Postprocessing: a step's tokens -> the sequences' records and the events they cause.

The third part of `Engine.step()` (schedule -> run -> postprocess): each sampled token is
appended to its sequence, the sequence is checked for a stop (EOS, stop token ids, stop
strings, `max_tokens`), and the step's `TokenChunk` (streamed sequences going on) and
`SequenceDone` (sequences that ended) events are assembled. No model and no mlx here: the
tokenizer enters as a `decode(ids) -> str` function, so this module is tested with a real
tokenizer and no model (tests/test_postprocess.py).
"""

from __future__ import annotations

import functools
from typing import Callable, Iterable, Optional, Sequence as Seq

from mlxsup.ipc.messages import (
    FINISH_LENGTH,
    FINISH_STOP,
    LOGPROBS_NONE,
    Event,
    SequenceDone,
    TokenChunk,
)

from .sequence import Sequence, SeqStatus

Decode = Callable[[list[int]], str]

# Tokens a StopStrings window may hold while every one of them leaves an incomplete character
# (only a model emitting invalid UTF-8 gets near it); past it the window's text is taken as
# it is, so one token's check never decodes more than this many tokens.
MAX_PENDING_TOKENS = 64


def decoder_for(tokenizer) -> Decode:
    """The `decode(ids)` that stop strings are matched against: the tokenizer's own, special
    tokens included. When the Hugging Face tokenizer (under mlx-lm's `TokenizerWrapper`)
    decodes exactly as its `tokenizers` backend does (no subclass overriding the decoding, no
    space clean-up), the backend's is called directly: the same text without the Python
    layer's work per call, which a batch pays per row and step."""
    try:
        from transformers.tokenization_utils_base import PreTrainedTokenizerBase
        from transformers.tokenization_utils_tokenizers import TokenizersBackend
    except ImportError:  # another transformers layout: its decode, slower and the same
        return tokenizer.decode
    hf = tokenizer
    if not isinstance(hf, PreTrainedTokenizerBase):  # mlx-lm's wrapper holds it
        hf = getattr(tokenizer, "_tokenizer", None)
    backend = getattr(hf, "backend_tokenizer", None)
    cls = type(hf)
    if (isinstance(hf, TokenizersBackend) and backend is not None
            and cls.decode is PreTrainedTokenizerBase.decode
            and cls._decode is TokenizersBackend._decode
            and getattr(hf, "clean_up_tokenization_spaces", True) is False):
        return functools.partial(backend.decode, skip_special_tokens=False)
    return tokenizer.decode


class StopStrings:
    """Finds the first token of a completion whose decoded text contains a stop string,
    decoding only the tokens since the last complete character.

    Exactly the check "`any(s in decode(ids) for s in stops)` after each token", with
    `decode` the tokenizer's own, made incremental by decoding a window of tokens from the
    last committed text on (the prefix-offset scheme of vLLM's detokenizer and of tokenizers'
    `DecodeStream`: the window starts a token early, so a decoder that treats a word's first
    token differently, SentencePiece's leading space, sees it in context). Written here
    rather than taken from `DecodeStream` or mlx-lm's streaming detokenizers because those
    hold back the text of a window whose last character is incomplete (and mlx-lm's BPE one a
    trailing space, and it trims the first one): a stop string completed by the characters
    before a split one would be found a token late, and the check searches that held-back
    text too. Only the last `max(len(stop)) - 1` committed characters are kept: an earlier
    occurrence would have ended the sequence already.
    """

    __slots__ = ("stops", "_keep", "_decode", "_window", "_read", "_prefix_len", "_tail")

    def __init__(self, stops: Iterable[str], decode: Decode):
        self.stops = tuple(stops)
        self._keep = max((len(s) for s in self.stops), default=1) - 1
        self._decode = decode
        self._window: list[int] = []  # the tokens from the prefix offset on
        self._read = 0  # window[:read]: the context whose text is already committed
        self._prefix_len = 0  # len(decode(window[:read]))
        self._tail = ""  # the last `_keep` characters of the committed text

    def push(self, token: int) -> bool:
        """Add the completion's next token; True when its text now contains a stop string."""
        window = self._window
        window.append(token)
        new = self._decode(window)[self._prefix_len:]
        text = self._tail + new  # the completion's text from `_keep` characters before `new`
        found = any(s in text for s in self.stops)
        pending = len(window) - self._read
        if (new and not new.endswith("\ufffd")) or pending >= MAX_PENDING_TOKENS:
            # Commit: the text is whole, or has waited long enough for a character's bytes.
            self._tail = text[-self._keep:] if self._keep else ""
            self._window = window = window[self._read:]
            self._prefix_len = len(self._decode(window))
            self._read = len(window)
        return found


class Postprocessor:
    """Turns a step's tokens into events. `decode` is the tokenizer's `decode(ids)` (special
    tokens included, as the stop strings are matched); `eos_token_ids` end a sequence unless
    its request sets `ignore_eos`."""

    def __init__(self, decode: Decode, eos_token_ids: Iterable[int] = ()):
        self.decode = decode
        self.eos_token_ids = frozenset(eos_token_ids)

    def accept(self, seqs: Seq[Optional[Sequence]], tokens: Seq[int], logprobs: Seq[float],
               version: int, now: float, events: list[Event], top_ids=None,
               top_logprobs=None) -> list[Sequence]:
        """Row i of a step produced `tokens[i]` (with `logprobs[i]`, under weights `version`;
        with `top_ids`, rows of the step's most likely tokens and `top_logprobs` theirs, of which
        a sequence keeps its params' `top_logprobs`)
        for `seqs[i]`; a row whose sequence is None or no longer running (aborted after its
        step was queued) is skipped. Appends a `TokenChunk` to `events` for each streamed
        sequence that goes on and a `SequenceDone` for each that ended (its `finish_reason`
        set); returns the ones that ended, whose rows and records the caller releases."""
        batch_size = len(seqs)
        ended: list[Sequence] = []
        for row, (seq, token, logprob) in enumerate(zip(seqs, tokens, logprobs)):
            if seq is None or seq.status != SeqStatus.RUNNING:
                continue
            seq.token_ids.append(token)
            seq.logprobs.append(logprob)
            seq.versions.append(version)
            k = seq.params.top_logprobs
            if k and top_ids is not None:
                seq.top_ids += top_ids[row][:k]
                seq.top_logprobs += top_logprobs[row][:k]
            seq.max_batch_size = max(seq.max_batch_size, batch_size)
            if len(seq.token_ids) == 1:
                seq.first_token_at = now
            reason = self.stop_reason(seq, token)
            if reason is not None:
                seq.finish_reason = reason
                ended.append(seq)
                events.append(self.done(seq, now, version))
            elif seq.request.request.stream:
                events.append(self.chunk(seq))
        return ended

    def stop_reason(self, seq: Sequence, token: int) -> Optional[str]:
        """Why `seq` ends with `token`, its newest token (None: it goes on). Called once per
        token, in order: the stop-string check is incremental."""
        params = seq.params
        if (token in self.eos_token_ids and not params.ignore_eos) or token in params.stop_token_ids:
            return FINISH_STOP
        if params.stop_strings:
            # The first token whose text completes a stop string ends the sequence, so ids and
            # text end together: decode(ids) holds the stop string, decode(ids[:-1]) does not.
            if seq.stop_check is None:
                seq.stop_check = StopStrings(params.stop_strings, self.decode)
            if seq.stop_check.push(token):
                return FINISH_STOP
        if len(seq.token_ids) >= seq.max_tokens:
            return FINISH_LENGTH
        return None

    @staticmethod
    def chunk(seq: Sequence) -> TokenChunk:
        """The tokens of `seq` not sent yet, as a streamed chunk."""
        start, seq.num_sent = seq.num_sent, len(seq.token_ids)
        return TokenChunk(
            request_id=seq.request.request_id, seq_index=seq.index,
            token_ids=seq.token_ids[start:], logprobs=_logprobs(seq, start),
            versions=seq.versions[start:], **_top(seq, start),
        )

    @staticmethod
    def done(seq: Sequence, now: float, policy_version: int) -> SequenceDone:
        """The `SequenceDone` of `seq` (its `finish_reason` set): the tokens not sent in
        chunks, and its timings from its request's arrival to `now` (`time.monotonic()`).
        `policy_version` is reported when it produced no token (aborted early)."""
        state = seq.request
        start, seq.num_sent = seq.num_sent, len(seq.token_ids)
        ms = lambda t: (t - state.arrival) * 1e3 if t else 0.0  # noqa: E731
        return SequenceDone(
            request_id=state.request_id, seq_index=seq.index, finish_reason=seq.finish_reason,
            token_ids=seq.token_ids[start:], logprobs=_logprobs(seq, start),
            versions=seq.versions[start:], num_prompt_tokens=state.num_prompt_tokens,
            batch_size=seq.max_batch_size,
            policy_version=seq.versions[0] if seq.versions else policy_version,
            queue_ms=ms(seq.admitted_at), ttft_ms=ms(seq.first_token_at), total_ms=ms(now),
            num_cached_tokens=state.num_cached_tokens, **_top(seq, start),
        )


def _logprobs(seq: Sequence, start: int) -> list[float]:
    return [] if seq.params.logprobs_mode == LOGPROBS_NONE else seq.logprobs[start:]


def _top(seq: Sequence, start: int) -> dict:
    """The top log-probs of tokens `start`.. (k per token, flat), when the request asks."""
    k = seq.params.top_logprobs
    if not k:
        return {}
    return dict(top_ids=seq.top_ids[start * k:], top_logprobs=seq.top_logprobs[start * k:])
