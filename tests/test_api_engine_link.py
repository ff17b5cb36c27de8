"""The API worker's engine link: flights, transparent re-send across one engine restart, refusal
across two, mid-stream failure, aborts (disconnect, timeout, POST /abort across workers), error
mapping; first on a scripted channel, then on the real shared-memory channel with the engine
side driven by hand."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import secrets
import time

import pytest

from mlxsup.api.engine_link import IpcEngineLink
from mlxsup.api.errors import ApiError
from mlxsup.ipc.control import ControlSnapshot
from mlxsup.ipc.messages import (
    AbortRequest,
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

pytestmark = pytest.mark.timeout(60)

PARAMS = SamplingParams(max_tokens=4, logprobs_mode="processed")


def done(rid, seq=0, ids=(5, 6), version=0, finish="length"):
    return SequenceDone(request_id=rid, seq_index=seq, finish_reason=finish, token_ids=list(ids),
                        logprobs=[-0.1] * len(ids), versions=[version] * len(ids),
                        num_prompt_tokens=3, batch_size=1, policy_version=version)


class ScriptedControl:
    def __init__(self):
        self.snap = ControlSnapshot(engine_epoch=1, engine_state="ready", heartbeat_ns=time.time_ns())

    def read(self):
        return dataclasses.replace(self.snap, heartbeat_ns=time.time_ns())

    def set(self, **fields):
        self.snap = dataclasses.replace(self.snap, **fields)


class ScriptedChannel:
    """WorkerChannel's interface; the test plays the engine through `sent` and `emit`."""

    slot = 3
    generation = 1

    def __init__(self):
        self.control = ScriptedControl()
        self.sent = []
        self.queues = {}
        self.counter = 0
        self.closed = False

    def new_request_id(self):
        self.counter += 1
        return self.counter

    def register(self, rid):
        self.queues[rid] = asyncio.Queue()
        return self.queues[rid]

    def unregister(self, rid):
        self.queues.pop(rid, None)

    async def send(self, request):
        self.sent.append(request)

    async def close(self):
        self.closed = True

    def emit(self, event):
        queue = self.queues.get(event.request_id)
        if queue is not None:
            queue.put_nowait(event)

    def requests(self, kind=GenerateRequest):
        return [r for r in self.sent if isinstance(r, kind)]


async def wait_until(predicate, timeout=5.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached")
        await asyncio.sleep(0.005)


@pytest.fixture
def run_dir(tmp_path):
    return str(tmp_path)


async def started_link(run_dir, channel=None, **kw):
    channel = channel or ScriptedChannel()

    async def opener(_run_dir):
        return channel

    link = IpcEngineLink(run_dir, open_channel=opener, **kw)
    await link.start()
    return link, channel


def run(coro):
    return asyncio.run(coro)


def test_generate_collects_every_sample_in_order(run_dir):
    async def main():
        link, ch = await started_link(run_dir)
        task = asyncio.ensure_future(link.generate([1, 2, 3], PARAMS, n=2, tag="t"))
        await wait_until(lambda: ch.requests())
        req = ch.requests()[0]
        assert req.n == 2 and req.stream is False and list(req.prompt_ids) == [1, 2, 3]
        ch.emit(done(req.request_id, seq=1, ids=(9,)))
        ch.emit(done(req.request_id, seq=0, ids=(7, 8)))
        samples = await task
        assert [s.seq_index for s in samples] == [0, 1] and list(samples[0].token_ids) == [7, 8]
        assert not ch.requests(AbortRequest)  # finished requests are not aborted
        assert link.status().num_inflight == 0 and not ch.queues
        await link.close()
        assert ch.closed

    run(main())


def test_request_lost_in_one_restart_is_sent_again(run_dir):
    async def main():
        link, ch = await started_link(run_dir)
        task = asyncio.ensure_future(link.generate([1, 2], PARAMS, tag="t"))
        await wait_until(lambda: ch.requests())
        first = ch.requests()[0].request_id
        ch.control.set(engine_epoch=2, engine_state="starting")  # the engine died; a new one boots
        await asyncio.sleep(0.2)
        assert len(ch.requests()) == 1  # waits for the new engine to be ready
        ch.control.set(engine_state="ready")
        await wait_until(lambda: len(ch.requests()) == 2)
        second = ch.requests()[1].request_id
        assert second != first
        ch.emit(done(first))  # a late event of the old request id is dropped
        ch.emit(done(second, ids=(4, 4, 4)))
        (sample,) = await task
        assert list(sample.token_ids) == [4, 4, 4]
        assert first in [a.request_id for a in ch.requests(AbortRequest)]  # in case it survived
        await link.close()

    run(main())


def test_request_in_flight_across_two_deaths_is_refused(run_dir):
    async def main():
        link, ch = await started_link(run_dir)
        task = asyncio.ensure_future(link.generate([1, 2], PARAMS))
        await wait_until(lambda: ch.requests())
        ch.control.set(engine_epoch=2)
        await wait_until(lambda: len(ch.requests()) == 2)
        ch.control.set(engine_epoch=3)
        with pytest.raises(ApiError) as e:
            await task
        assert e.value.status == 422 and e.value.type == "request_refused"
        assert "twice" in e.value.message
        assert len(ch.requests()) == 2  # no third try
        await link.close()

    run(main())


def test_stream_that_already_delivered_tokens_fails_retryable(run_dir):
    async def main():
        link, ch = await started_link(run_dir)
        got = []

        async def consume():
            async for event in link.stream([1], PARAMS, tag="s"):
                got.append(event)

        task = asyncio.ensure_future(consume())
        await wait_until(lambda: ch.requests())
        req = ch.requests()[0]
        assert req.stream is True
        ch.emit(TokenChunk(req.request_id, 0, [5], [-0.1], [0]))
        await wait_until(lambda: got)
        ch.control.set(engine_epoch=2)
        with pytest.raises(ApiError) as e:
            await task
        assert e.value.status == 503 and "Retry-After" in e.value.headers
        assert len(ch.requests()) == 1
        await link.close()

    run(main())


def test_stream_before_any_token_is_sent_again(run_dir):
    async def main():
        link, ch = await started_link(run_dir)
        got = []

        async def consume():
            async for event in link.stream([1], PARAMS):
                got.append(event)

        task = asyncio.ensure_future(consume())
        await wait_until(lambda: ch.requests())
        ch.control.set(engine_epoch=2)
        await wait_until(lambda: len(ch.requests()) == 2)
        rid = ch.requests()[1].request_id
        ch.emit(TokenChunk(rid, 0, [5], [-0.1], [0]))
        ch.emit(done(rid, ids=()))
        await task
        assert [type(e).__name__ for e in got] == ["TokenChunk", "SequenceDone"]
        await link.close()

    run(main())


@pytest.mark.parametrize("code,status,retry", [("invalid", 422, False), ("overloaded", 503, True),
                                               ("timeout", 503, True), ("internal", 500, False)])
def test_engine_error_codes_map_to_http(run_dir, code, status, retry):
    async def main():
        link, ch = await started_link(run_dir)
        task = asyncio.ensure_future(link.generate([1], PARAMS))
        await wait_until(lambda: ch.requests())
        ch.emit(ErrorEvent(ch.requests()[0].request_id, code, "nope", field="prompt_ids" if code == "invalid" else ""))
        with pytest.raises(ApiError) as e:
            await task
        assert e.value.status == status and ("Retry-After" in e.value.headers) == retry
        if code == "invalid":
            assert e.value.field == "prompt_ids"
        assert not ch.requests(AbortRequest)
        await link.close()

    run(main())


def test_cancelled_request_is_aborted(run_dir):
    """gunicorn cancels a request's task when its client disconnects."""
    async def main():
        link, ch = await started_link(run_dir)
        task = asyncio.ensure_future(link.generate([1], PARAMS))
        await wait_until(lambda: ch.requests())
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await wait_until(lambda: ch.requests(AbortRequest))
        assert ch.requests(AbortRequest)[0].request_id == ch.requests()[0].request_id
        assert link.status().num_inflight == 0
        await link.close()

    run(main())


def test_timeout_answers_503_and_aborts(run_dir):
    async def main():
        link, ch = await started_link(run_dir, request_timeout_s=0.2)
        with pytest.raises(ApiError) as e:
            await link.generate([1], PARAMS)
        assert e.value.status == 503 and e.value.type == "timeout"
        await wait_until(lambda: ch.requests(AbortRequest))
        await link.close()

    run(main())


def test_not_ready_engine_refuses_at_once(run_dir):
    async def main():
        link, ch = await started_link(run_dir)
        for fields in ({"engine_state": "starting"}, {"engine_state": "ready", "supervisor_state": "restarting"},
                       {"supervisor_state": "", "heartbeat_ns": 1}):
            ch.control.set(**fields)
            ch.control.read = (lambda snap: (lambda: snap))(ch.control.snap)  # keep a stale heartbeat as set
            assert not link.status().is_ready
            with pytest.raises(ApiError) as e:
                await link.generate([1], PARAMS)
            assert e.value.status == 503 and e.value.headers["Retry-After"]
        assert not ch.sent
        await link.close()

    run(main())


def test_score(run_dir):
    async def main():
        link, ch = await started_link(run_dir)
        task = asyncio.ensure_future(link.score([1, 2], [3, 4], logprobs_mode="raw", params=PARAMS))
        await wait_until(lambda: ch.requests(ScoreRequest))
        req = ch.requests(ScoreRequest)[0]
        assert list(req.completion_ids) == [3, 4] and req.logprobs_mode == "raw"
        ch.emit(ScoreResult(req.request_id, [-1.0, -2.0], 7))
        result = await task
        assert list(result.logprobs) == [-1.0, -2.0] and result.policy_version == 7
        await link.close()

    run(main())


def test_abort_of_a_request_held_elsewhere_goes_to_the_engine(run_dir):
    async def main():
        owner, ch = await started_link(run_dir)
        other, other_ch = await started_link(run_dir)
        task = asyncio.ensure_future(owner.generate([1], PARAMS, tag="trainer-17"))
        await wait_until(lambda: ch.requests())
        assert ch.requests()[0].tag == "trainer-17"  # the engine knows the client's id
        assert await other.abort("trainer-17") == 0  # not in that worker: sent to the engine
        assert other_ch.requests(AbortTagged) == [AbortTagged("trainer-17")]
        rid = ch.requests()[0].request_id
        ch.emit(done(rid, finish="abort", ids=(5,)))  # what the engine answers the owner
        (sample,) = await task
        assert sample.finish_reason == "abort" and list(sample.token_ids) == [5]
        await owner.close()
        await other.close()

    run(main())


def test_link_keeps_trying_to_open(run_dir):
    async def main():
        attempts = []
        channel = ScriptedChannel()

        async def opener(_):
            attempts.append(1)
            if len(attempts) < 3:
                raise FileNotFoundError("ipc.json")
            return channel

        link = IpcEngineLink(run_dir, open_channel=opener)
        await link.start()
        status = link.status()
        assert not status.link_open and not status.is_ready and "not connected" in status.why_not_ready()
        with pytest.raises(ApiError) as e:
            await link.generate([1], PARAMS)
        assert e.value.status == 503
        await wait_until(lambda: link.status().link_open, timeout=5)
        assert link.status().slot == 3
        await link.close()

    run(main())


def test_tokens_per_s_from_the_counter(run_dir, monkeypatch):
    async def main():
        link, ch = await started_link(run_dir)
        clock = [1000.0]
        monkeypatch.setattr("mlxsup.api.engine_link.time.monotonic", lambda: clock[0])
        link._tick()
        clock[0] += 2.0
        ch.control.set(tokens_generated=500)
        link._tick()
        assert link.status().tokens_per_s == pytest.approx(250.0)
        ch.control.set(engine_epoch=2, tokens_generated=0)  # a new engine restarts its counters
        clock[0] += 1.0
        link._tick()
        assert link.status().tokens_per_s == 0.0
        await link.close()

    run(main())


# ---------------------------------------------------------------------- real shared-memory channel


@pytest.fixture
def ipc(tmp_path):
    from mlxsup.ipc.layout import IpcLayout
    from mlxsup.ipc.segments import create_ipc

    layout = IpcLayout(run_dir=str(tmp_path / "run"), instance_id=secrets.token_hex(4), num_slots=2,
                       request_ring_bytes=1 << 16, response_ring_bytes=1 << 16)
    resources = create_ipc(layout)
    try:
        yield layout, resources
    finally:
        resources.destroy()


def test_real_channel_round_trip_and_restart(ipc):
    """The link on the real WorkerChannel; the engine side (EngineChannel + control block) is
    played by hand in the same event loop."""
    from mlxsup.ipc.channel import EngineChannel

    layout, resources = ipc
    control = resources.control
    control.write(engine_epoch=1, engine_state="ready", policy_version=4)

    async def main():
        engine = EngineChannel(layout)
        link = IpcEngineLink(layout.run_dir)
        await link.start()
        assert link.status().link_open and link.status().is_ready
        assert link.status().policy_version == 4

        async def poll(kind):
            deadline = time.monotonic() + 5
            while True:
                for slot, msg in engine.poll():
                    if isinstance(msg, kind):
                        return slot, msg
                if time.monotonic() > deadline:
                    raise AssertionError(f"no {kind.__name__}")
                await asyncio.sleep(0.005)

        task = asyncio.ensure_future(link.generate(list(range(1, 3000)), PARAMS, n=2))  # several ring frames
        slot, req = await poll(GenerateRequest)
        assert len(req.prompt_ids) == 2999 and req.n == 2
        for seq in (0, 1):
            engine.send(slot, done(req.request_id, seq=seq, ids=(10 + seq, 11), version=4))
        engine.flush()
        samples = await task
        assert [list(s.token_ids) for s in samples] == [[10, 11], [11, 11]]

        # a restart: the request is sent again under the new epoch and answered there
        task = asyncio.ensure_future(link.generate([1, 2], PARAMS))
        slot, first = await poll(GenerateRequest)
        control.write(engine_epoch=2, engine_state="starting")
        await asyncio.sleep(0.15)
        control.write(engine_state="ready")
        slot, again = await poll(GenerateRequest)
        assert again.request_id != first.request_id
        engine.send(slot, done(again.request_id, ids=(3,)))
        engine.flush()
        (sample,) = await task
        assert list(sample.token_ids) == [3]

        # a cancelled request (client gone) reaches the engine as an AbortRequest
        task = asyncio.ensure_future(link.generate([1], PARAMS))
        slot, req = await poll(GenerateRequest)
        task.cancel()
        slot, abort = await poll(AbortRequest)
        assert abort.request_id in (req.request_id, first.request_id)
        await link.close()
        engine.close()

    asyncio.run(main())


def test_real_channel_each_worker_gets_its_own_slot(ipc):
    layout, resources = ipc
    resources.control.write(engine_epoch=1, engine_state="ready")

    async def main():
        links = [IpcEngineLink(layout.run_dir) for _ in range(3)]
        for link in links:
            await link.start()
        slots = [link.status().slot for link in links[:2]]
        assert sorted(slots) == [0, 1]
        assert not links[2].status().link_open  # no free slot: keeps trying, answers 503
        await links[0].close()
        await wait_until(lambda: links[2].status().link_open, timeout=5)
        assert links[2].status().slot == slots[0]
        for link in links[1:]:
            await link.close()

    asyncio.run(main())


def test_hello_is_the_first_message(ipc):
    from mlxsup.ipc.channel import EngineChannel

    layout, resources = ipc
    resources.control.write(engine_epoch=1, engine_state="ready")

    async def main():
        engine = EngineChannel(layout)
        link = IpcEngineLink(layout.run_dir)
        await link.start()
        msgs = [m for _, m in engine.poll()]
        assert isinstance(msgs[0], Hello) and msgs[0].pid == os.getpid()
        await link.close()
        engine.close()

    asyncio.run(main())
