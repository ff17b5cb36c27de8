"""The engine's postprocessing without a model: stop strings decoded incrementally with real
tokenizers (the test models' byte-level BPE, and one trained here on accented and CJK text
so that tokens end inside a character), streaming chunk offsets and SequenceDone assembly."""

from __future__ import annotations

import os
import random
import subprocess
import sys

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from mlxsup.engine import postprocess
from mlxsup.engine.postprocess import Postprocessor, StopStrings, decoder_for
from mlxsup.engine.sequence import RequestState, Sequence, SeqStatus
from mlxsup.ipc.messages import GenerateRequest, SamplingParams, SequenceDone, TokenChunk

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def hf_tokenizer(tiny_model_dir):
    """The tokenizer the engine decodes with (mlx-lm wraps this one)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="module")
def multibyte():
    """A byte-level BPE trained on accented and CJK words: its merges join bytes across
    character boundaries, so some tokens end in the middle of a character ("cafÃ" is the
    bytes of "caf" and the first byte of "é")."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    words = ["café", "naïve", "crème", "brûlée", "中文", "日本語", "漢字", "tea", "the"]
    rng = random.Random(0)
    lines = [" ".join(rng.choice(words) for _ in range(8)) for _ in range(400)]
    tok.train_from_iterator(lines, trainers.BpeTrainer(
        vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=["<|eot|>"], show_progress=False))
    return tok


def first_stop(decode, ids, stops):
    """The reference: the first k whose decode(ids[:k]) contains a stop string (the engine's
    check before it was incremental), else None."""
    for k in range(1, len(ids) + 1):
        text = decode(ids[:k])
        if any(s in text for s in stops):
            return k
    return None


def incremental_stop(decode, ids, stops):
    check = StopStrings(stops, decode)
    for k, t in enumerate(ids, 1):
        if check.push(t):
            return k
    return None


class CountingDecode:
    """A decode that records how many ids each call decoded."""

    def __init__(self, decode):
        self.decode, self.sizes = decode, []

    def __call__(self, ids):
        self.sizes.append(len(ids))
        return self.decode(ids)


def test_postprocessing_imports_no_mlx():
    # Loaded without the package's __init__ (which imports the engine), with mlx unimportable.
    code = (
        "import sys, types\n"
        "sys.modules['mlx'] = sys.modules['mlx_lm'] = None\n"
        "pkg = types.ModuleType('mlxsup.engine')\n"
        f"pkg.__path__ = [{os.path.dirname(postprocess.__file__)!r}]\n"
        "sys.modules['mlxsup.engine'] = pkg\n"
        "import mlxsup.engine.postprocess\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


# ------------------------------------------------------------------ stop strings


def test_stop_string_spanning_token_boundaries(hf_tokenizer):
    decode = hf_tokenizer.decode
    ids = hf_tokenizer.encode("Once upon a time the cat sat on the mat.", add_special_tokens=False)
    ends = [len(decode(ids[:k])) for k in range(len(ids) + 1)]  # token i: ends[i]:ends[i+1]
    text = decode(ids)
    # from inside token i to inside token i + 2, so no one token holds it
    i = next(i for i in range(len(ids) - 2)
             if ends[i + 1] - ends[i] >= 2 and ends[i + 3] - ends[i + 2] >= 2)
    stop = text[ends[i] + 1:ends[i + 3] - 1]
    assert text.find(stop) == ends[i] + 1
    k = incremental_stop(decode, ids, (stop,))
    assert k == first_stop(decode, ids, (stop,)) == i + 3
    assert stop in decode(ids[:k]) and stop not in decode(ids[:k - 1])


def test_several_stops_the_first_completed_wins(hf_tokenizer):
    ids = hf_tokenizer.encode("The cat sat on the mat and looked at the dog.",
                              add_special_tokens=False)
    decode = hf_tokenizer.decode
    stops = ("dog", "mat a", "zzz")
    k = incremental_stop(decode, ids, stops)
    assert k == first_stop(decode, ids, stops)
    assert "mat a" in decode(ids[:k]) and "dog" not in decode(ids[:k])
    assert incremental_stop(decode, ids, ("zzz", "qq")) is None


def test_a_character_split_over_byte_tokens(hf_tokenizer):
    # The demo tokenizer has no merges for "é": it is two byte tokens, each alone U+FFFD.
    decode = hf_tokenizer.decode
    ids = hf_tokenizer.encode("the café is open", add_special_tokens=False)
    split = [k for k in range(1, len(ids) + 1) if decode(ids[:k]).endswith("\ufffd")]
    assert split, "expected a token that ends inside a character"
    for stop in ("é", "fé", "é i"):
        k = incremental_stop(decode, ids, (stop,))
        assert k == first_stop(decode, ids, (stop,))
        assert k - 1 not in split or stop not in decode(ids[:k - 1])


def test_a_token_ending_inside_a_character_still_completes_a_stop(multibyte):
    decode = lambda ids: multibyte.decode(ids, skip_special_tokens=False)  # noqa: E731
    partial = multibyte.token_to_id("na\u00c3")  # b"na\xc3": "na" and half of "ï"
    assert partial is not None and decode([partial]) == "na\ufffd"
    head = multibyte.encode("tea ").ids
    ids = head + [partial, multibyte.token_to_id("\u00af")] + multibyte.encode("ve the").ids
    assert "tea naïve the" == decode(ids)
    # "na" is in the text as soon as the half-character token arrives, before the character
    # is whole: a detokenizer that holds that text back would stop a token late.
    k = incremental_stop(decode, ids, ("a na",))
    assert k == first_stop(decode, ids, ("a na",)) == len(head) + 1
    k = incremental_stop(decode, ids, ("aï",))
    assert k == first_stop(decode, ids, ("aï",)) == len(head) + 2


@pytest.mark.parametrize("which", ["hf", "multibyte"])
def test_random_tokens_stop_exactly_where_the_whole_decode_does(which, hf_tokenizer, multibyte):
    # Random ids: special tokens, stray continuation bytes, characters split anywhere.
    if which == "hf":  # the engine's decode against the tokenizer's own
        decode, reference, vocab = decoder_for(hf_tokenizer), hf_tokenizer.decode, len(hf_tokenizer)
        assert decode != hf_tokenizer.decode  # (its backend's, called directly)
    else:
        decode = reference = lambda ids: multibyte.decode(ids, skip_special_tokens=False)  # noqa: E731
        vocab = multibyte.get_vocab_size()
    rng = random.Random(7)
    hits = 0
    for _ in range(150):
        ids = [rng.randrange(vocab) for _ in range(rng.randrange(1, 50))]
        other = decode([rng.randrange(vocab) for _ in range(30)])
        stops = []
        for _ in range(rng.randrange(1, 4)):
            a = rng.randrange(len(other))
            stops.append(other[a:a + rng.randrange(1, 6)])
        text = reference(ids)  # and one that surely occurs
        if rng.random() < 0.5 and len(text) > 2:
            a = rng.randrange(len(text) - 1)
            stops.append(text[a:a + rng.randrange(1, 5)])
        want = first_stop(reference, ids, stops)
        assert incremental_stop(decode, ids, stops) == want, (ids, stops)
        hits += want is not None
    assert hits > 50


def test_each_token_decodes_a_few_tokens_not_the_completion(hf_tokenizer):
    text = "Once upon a time the cat sat on the mat. " * 40
    ids = hf_tokenizer.encode(text, add_special_tokens=False)
    decode = CountingDecode(hf_tokenizer.decode)
    assert incremental_stop(decode, ids, ("never there",)) is None
    assert len(ids) > 300 and max(decode.sizes) <= 4
    assert len(decode.sizes) <= 2 * len(ids)


# ------------------------------------------------------------------ events


def running_seqs(request, max_tokens=None):
    state = RequestState(request, arrival=100.0)
    for i in range(request.n):
        seq = Sequence(i, state, i, max_tokens or request.params.max_tokens, seed=i)
        seq.status, seq.admitted_at = SeqStatus.RUNNING, 100.5
        state.seqs.append(seq)
    return state


def finish(seqs):
    for seq in seqs:
        seq.status = SeqStatus.FINISHED


def test_streaming_chunks_then_done_carry_every_token_once(hf_tokenizer):
    post = Postprocessor(hf_tokenizer.decode)
    request = GenerateRequest(7, [1, 2, 3], SamplingParams(max_tokens=5, logprobs_mode="raw"),
                              n=2, stream=True)
    state = running_seqs(request)
    events = []
    for step in range(5):
        now = 101.0 + step
        ended = post.accept(state.seqs, [10 + step, 20 + step], [-0.5 - step, -1.5 - step],
                            version=3 if step < 2 else 4, now=now, events=events)
        finish(ended)
        assert len(ended) == (2 if step == 4 else 0)
    for idx, seq in enumerate(state.seqs):
        mine = [e for e in events if e.seq_index == idx]
        chunks, [done] = mine[:-1], mine[-1:]
        assert all(isinstance(c, TokenChunk) for c in chunks) and isinstance(done, SequenceDone)
        assert [c.token_ids for c in chunks] == [[t] for t in seq.token_ids[:4]]
        assert done.token_ids == seq.token_ids[4:] and len(seq.token_ids) == 5
        assert [x for c in chunks for x in c.logprobs] + list(done.logprobs) == seq.logprobs
        assert [v for c in chunks for v in c.versions] + list(done.versions) == [3, 3, 4, 4, 4]
        assert done.finish_reason == "length" and done.policy_version == 3
        assert done.batch_size == 2 and done.num_prompt_tokens == 3
        assert (done.queue_ms, done.ttft_ms, done.total_ms) == (500.0, 1000.0, 5000.0)


def test_unstreamed_stop_string_ends_with_every_token_in_done(hf_tokenizer):
    ids = hf_tokenizer.encode("The cat sat on the mat.", add_special_tokens=False)
    stop_at = first_stop(hf_tokenizer.decode, ids, ("on th",))
    post = Postprocessor(hf_tokenizer.decode)
    request = GenerateRequest(8, [1], SamplingParams(max_tokens=100, stop_strings=("on th",)))
    state = running_seqs(request)
    events = []
    for step, t in enumerate(ids):
        finish(post.accept(state.seqs, [t], [0.0], 0, 101.0, events))
        if events:
            break
    [done] = events
    assert step + 1 == stop_at and done.finish_reason == "stop"
    assert done.token_ids == ids[:stop_at] and done.logprobs == []  # logprobs_mode none


def test_eos_stop_ids_ignore_eos_and_skipped_rows(hf_tokenizer):
    post = Postprocessor(hf_tokenizer.decode, eos_token_ids=(2,))
    reqs = [GenerateRequest(1, [5], SamplingParams(max_tokens=9)),
            GenerateRequest(2, [5], SamplingParams(max_tokens=9, ignore_eos=True)),
            GenerateRequest(3, [5], SamplingParams(max_tokens=9, ignore_eos=True,
                                                   stop_token_ids=(2,))),
            GenerateRequest(4, [5], SamplingParams(max_tokens=9))]
    seqs = [running_seqs(r).seqs[0] for r in reqs]
    seqs[3].status = SeqStatus.FINISHED  # aborted after its step was queued
    events = []
    ended = post.accept(seqs + [None], [2, 2, 2, 2, 2], [0.0] * 5, 0, 101.0, events)
    assert ended == [seqs[0], seqs[2]]
    assert [(e.request_id, e.finish_reason) for e in events] == [(1, "stop"), (3, "stop")]
    assert seqs[1].token_ids == [2] and seqs[3].token_ids == []
    assert all(s.max_batch_size == 5 for s in seqs[:3])


def test_done_of_a_sequence_ended_before_its_first_token(hf_tokenizer):
    state = running_seqs(GenerateRequest(9, [5, 6], SamplingParams()))
    seq = state.seqs[0]
    seq.finish_reason = "abort"
    done = Postprocessor.done(seq, now=100.25, policy_version=6)
    assert (done.token_ids, done.versions, done.policy_version) == ([], [], 6)
    assert done.ttft_ms == 0.0 and done.total_ms == 250.0
