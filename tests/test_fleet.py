"""Replicas behind one address, swapping together (docs/scaling.md, Replicas), for real: three
`mlxsup start` servers on the tiny model behind HAProxy running examples/haproxy.cfg, a
GRPO-like loop through the balancer's address with a fleet swap (FleetClient) every step, and a
replica's supervisor SIGKILLed in the middle of a step.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from e2e_support import assert_nothing_left, free_port, make_adapter, start_server, stop_server, wait_for

from mlxsup.client import FleetClient, FleetSwapError, InferenceClient, as_results

pytestmark = [
    pytest.mark.timeout(300),
    pytest.mark.skipif(shutil.which("haproxy") is None,
                       reason="haproxy is not installed (Debian: apt-get install haproxy; .ci/run installs it)"),
]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_REPLICAS = 3
GROUPS = 6  # /generate requests per step, n=2 samples each


class Balancer:
    """HAProxy running examples/haproxy.cfg with this test's ports."""

    def __init__(self, tmp_path, ports: list[int]):
        with open(os.path.join(ROOT, "examples", "haproxy.cfg")) as f:
            text = f.read()
        self.port = free_port()
        text = re.sub(r"(?m)^    bind .*$", f"    bind 127.0.0.1:{self.port}", text)
        # Importing mlx_lm.utils caps this process's open files at 2048 (hard 4096), and
        # haproxy inherits that: with maxconn 4096 it needs ~8,200 descriptors and exits.
        text = re.sub(r"(?m)^    maxconn \d+$", "    maxconn 900", text)
        text = re.sub(r"(?m)^    server r\d .*\n", "", text)
        text += "".join(f"    server r{i + 1} 127.0.0.1:{p}\n" for i, p in enumerate(ports))
        self.config = str(tmp_path / "haproxy.cfg")
        with open(self.config, "w") as f:
            f.write(text)
        self.log = open(tmp_path / "haproxy.log", "w")
        self.proc = subprocess.Popen(["haproxy", "-db", "-f", self.config], stdout=self.log,
                                     stderr=subprocess.STDOUT)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.log.close()


@pytest.fixture(scope="module")
def fleet(tiny_model_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fleet")
    with ThreadPoolExecutor(NUM_REPLICAS) as pool:  # three starts at once
        starts = [pool.submit(start_server, tmp, tiny_model_dir, "--max-tokens", "4", "--max-batch", "8",
                              workers=1, name=f"r{i + 1}") for i in range(NUM_REPLICAS)]
    servers = [s.result() for s in starts if s.exception() is None]
    balancer = None
    try:
        errors = [s.exception() for s in starts if s.exception() is not None]
        if errors:
            raise errors[0]
        balancer = Balancer(tmp, [s.port for s in servers])
        wait_for(lambda: _all_up(balancer, len(servers)), timeout=30, what="haproxy to see every replica up")
        yield servers, balancer
    finally:
        if balancer is not None:
            balancer.stop()
        with ThreadPoolExecutor(NUM_REPLICAS) as pool:
            list(pool.map(stop_server, servers))
    for server in servers:
        assert_nothing_left(server)


def _all_up(balancer: Balancer, num: int) -> bool:
    seen = set()
    with httpx.Client(base_url=balancer.url, timeout=5) as c:
        for _ in range(3 * num):
            r = c.get("/health")
            if r.status_code == 200:
                seen.add(r.headers.get("x-served-by"))
    return len(seen) == num


def _generated_by(results: list[dict]) -> list[int]:
    """The version that generated each result (the top-level policy_version is the request's
    own, echoed), checked against the version of each of its tokens."""
    for r in results:
        assert set(r["token_versions"]) <= {r["generated_by_version"]}, r
    return [r["generated_by_version"] for r in results]


async def _step(balancer: Balancer, version: int, step: int) -> list[tuple[str, list[dict]]]:
    """One rollout step through the balancer: GROUPS requests of n=2 samples, each asking
    min_policy_version=version; (replica name, results) per request."""
    async with httpx.AsyncClient(base_url=balancer.url, timeout=120) as c:
        async def group(g):
            r = await c.post("/generate", json={
                "prompt": f"step {step} prompt {g}", "n": 2, "temperature": 1.0, "max_tokens": 4,
                "logprobs": 1, "min_policy_version": version, "step_id": step, "policy_version": version})
            assert r.status_code == 200, r.text
            return r.headers["x-served-by"], as_results(r.json())

        return await asyncio.gather(*(group(g) for g in range(GROUPS)))


def test_two_phase_swap_on_one_server(fleet, tiny_model_dir, tmp_path):
    """Prepare changes nothing; commit takes the version asked for (not below the next one);
    cancel drops it; a prepared id commits once; a bad adapter prepares nothing."""
    servers, _ = fleet
    server = servers[0]
    adapter = make_adapter(tmp_path / "a", tiny_model_dir, seed=11, rank=4)

    async def main():
        async with InferenceClient(server.url, max_retries=0) as c:
            before = server.version()
            prepared = await c.prepare_adapter(adapter)
            assert prepared["status"] == "prepared" and prepared["policy_version"] == before
            assert prepared["next_policy_version"] == before + 1
            served = await c.generate(prompt="hi", max_tokens=2)
            assert _generated_by([served]) == [before]  # prepared is not served
            done = await c.commit_adapter(prepared["prepared_id"], mode="drain", policy_version=before + 3)
            assert done["policy_version"] == before + 3 and done["adapter_path"] == os.path.realpath(adapter)
            assert _generated_by([await c.generate(prompt="hi", max_tokens=2)]) == [before + 3]
            with pytest.raises(Exception) as again:
                await c.commit_adapter(prepared["prepared_id"])
            assert getattr(again.value, "status", None) == 404 and again.value.field == "prepared_id"

            other = await c.prepare_adapter(None)
            with pytest.raises(Exception) as conflict:  # versions never repeat
                await c.commit_adapter(other["prepared_id"], policy_version=before + 3)
            assert getattr(conflict.value, "status", None) == 409 and conflict.value.field == "policy_version"
            cancelled = await c.cancel_adapter(other["prepared_id"])
            assert cancelled == {"status": "cancelled", "prepared_id": other["prepared_id"],
                                 "policy_version": before + 3}
            with pytest.raises(Exception) as gone:
                await c.commit_adapter(other["prepared_id"])
            assert getattr(gone.value, "status", None) == 404

            bad = tmp_path / "bad"
            bad.mkdir()
            (bad / "adapter_config.json").write_text('{"fine_tune_type": "lora"}')
            (bad / "adapters.safetensors").write_bytes(b"not safetensors")
            with pytest.raises(Exception) as refused:
                await c.prepare_adapter(str(bad))
            assert getattr(refused.value, "status", None) == 422
            assert _generated_by([await c.generate(prompt="hi", max_tokens=2)]) == [before + 3]

    asyncio.run(main())


def test_fleet_cli_reports_each_replica(fleet, tiny_model_dir, tmp_path):
    """`mlxsup fleet reload-adapter` from a replicas file: a replica that is down (a closed
    port) fails the swap before anything commits and is named; with --skip-unreachable the
    swap goes ahead on the others and prints their common version."""
    servers, _ = fleet
    down = f"http://127.0.0.1:{free_port()}"
    replicas = tmp_path / "replicas.txt"
    replicas.write_text("# the fleet\n" + "".join(f"{s.url}\n" for s in servers) + f"{down}  # down\n")
    before = [s.version() for s in servers]
    adapter = make_adapter(tmp_path / "cli", tiny_model_dir, seed=400, rank=4)
    cmd = [sys.executable, "-m", "mlxsup", "fleet", "reload-adapter", adapter, "--replicas-file", str(replicas)]
    strict = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert strict.returncode == 1 and down in strict.stderr and "not committed anywhere" in strict.stderr
    assert [s.version() for s in servers] == before
    skipping = subprocess.run(cmd + ["--skip-unreachable"], capture_output=True, text=True, timeout=120)
    assert skipping.returncode == 0, skipping.stderr
    version = int(skipping.stdout.strip())
    assert version == max(before) + 1
    assert [s.version() for s in servers] == [version] * len(servers)
    assert f"skipped {down}" in skipping.stderr


def test_grpo_loop_through_the_balancer_with_a_fleet_swap_every_step(fleet, tiny_model_dir, tmp_path):
    servers, balancer = fleet
    urls = [s.url for s in servers]

    async def main():
        async with FleetClient(urls, max_retries=1, timeout=120) as fleet_client:
            # Replicas start on different counters (the last test moved r1's): a fleet swap
            # commits one version everywhere, the highest next version among them.
            versions = []
            served_by = set()
            for step in range(3):
                adapter = make_adapter(tmp_path / f"step{step}", tiny_model_dir, seed=100 + step, rank=4)
                swap = await fleet_client.reload_adapter(adapter)
                assert sorted(swap.committed) == sorted(urls) and not swap.skipped
                assert set((await fleet_client.versions()).values()) == {swap.policy_version}
                versions.append(swap.policy_version)
                for name, results in await _step(balancer, swap.policy_version, step):
                    served_by.add(name)
                    # zero completions of another version within the step, on every replica
                    assert _generated_by(results) == [swap.policy_version] * 2, name
            assert versions == sorted(set(versions)), versions
            assert len(served_by) >= 2, served_by  # the balancer spread the step's requests

            # min_policy_version is honoured whichever replica takes the request: r2 and r3
            # commit only after the requests are sent, so the ones routed there wait for it.
            adapter = make_adapter(tmp_path / "lagging", tiny_model_dir, seed=200, rank=4)
            clients = fleet_client.clients
            prepared = {u: await clients[u].prepare_adapter(adapter) for u in urls}
            version = max(p["next_policy_version"] for p in prepared.values())
            await clients[urls[0]].commit_adapter(prepared[urls[0]]["prepared_id"], policy_version=version)
            step = asyncio.create_task(_step(balancer, version, 10))
            await asyncio.sleep(1.0)
            assert not step.done()  # the requests routed to r2 and r3 are waiting for the version
            for u in urls[1:]:
                await clients[u].commit_adapter(prepared[u]["prepared_id"], policy_version=version)
            results = await step
            assert {name for name, _ in results} - {"r1"}, "no request reached a lagging replica"
            for name, rs in results:
                assert _generated_by(rs) == [version] * 2, name

            # A replica's supervisor is SIGKILLed while a step runs: the step completes on the
            # others (HAProxy retries what the dead one dropped, and its checks take it out).
            dead = servers[2]
            step = asyncio.create_task(_step(balancer, version, 11))
            await asyncio.sleep(0.3)
            os.kill(dead.status()["supervisor_pid"], signal.SIGKILL)
            for name, rs in await step:
                assert _generated_by(rs) == [version] * 2, name

            # The next swap, strict: it fails on the dead replica before anything commits, and
            # the live replicas cancel what they prepared.
            adapter = make_adapter(tmp_path / "after", tiny_model_dir, seed=300, rank=4)
            with pytest.raises(FleetSwapError) as failed:
                await fleet_client.reload_adapter(adapter)
            assert failed.value.phase == "prepare" and list(failed.value.failed) == [dead.url]
            assert "cannot connect" in failed.value.failed[dead.url]
            assert sorted(failed.value.cancelled) == sorted(urls[:2]) and failed.value.committed == []
            live = await fleet_client.versions()
            assert live[urls[0]] == live[urls[1]] == version and isinstance(live[dead.url], Exception)

            # With skip_unreachable the run goes on: swapped on the live two, the dead one named.
            swap = await fleet_client.reload_adapter(adapter, skip_unreachable=True)
            assert sorted(swap.committed) == sorted(urls[:2]) and list(swap.skipped) == [dead.url]
            assert swap.policy_version == version + 1
            for name, rs in await _step(balancer, swap.policy_version, 12):
                assert name != "r3"
                assert _generated_by(rs) == [swap.policy_version] * 2, name

    asyncio.run(main())
