"""Several mlxsup servers serving one policy, swapped together (docs/scaling.md, Replicas).

    async with FleetClient(["http://a:8000", "http://b:8000"], admin_key=KEY) as fleet:
        swap = await fleet.reload_adapter("/shared/adapters/step-12")
        print(swap.policy_version)  # every replica now serves this version

A swap runs in two phases: every replica prepares the adapter (reads, checks and readies it,
commits nothing: `/prepare_adapter`); once all have, every replica commits it as the same
version (`/commit_adapter`, the highest `next_policy_version` the replicas reported, so one
whose counter ran ahead keeps the fleet on one number). A replica that refuses or cannot be
reached while preparing makes the swap fail before anything is committed: the others cancel
what they prepared (`/cancel_adapter`), so no replica serves a version the others never reach.

After every replica prepared, a commit can still fail on one (it died between the phases, or
its engine refused at commit). Then the others have committed and the fleet is split:
`FleetSwapError` with phase "commit" lists which replicas committed and which did not. A
replica that is down serves nothing; one that comes back serves its old version until a
swap brings it up (the next `reload_adapter` commits it at the fleet's version, skipping the
ones it missed), and a request that asks a newer `min_policy_version` waits there (bounded)
instead of being served by the old weights.

Requests reach the replicas through a load balancer (docs/scaling.md: HAProxy); swaps go to
each replica directly, never through the balancer.

This module, like mlxsup.client, imports httpx and the standard library only.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any, Iterable, Optional

from mlxsup.client import InferenceClient, InferenceError, ServerUnavailableError

__all__ = ["FleetClient", "FleetSwap", "FleetSwapError", "read_replicas"]


def read_replicas(path: str) -> list[str]:
    """Replica URLs from a file: one per line; blank lines and `#` comments are skipped."""
    with open(path) as f:
        lines = [line.split("#", 1)[0].strip() for line in f]
    urls = [line for line in lines if line]
    if not urls:
        raise ValueError(f"{path} lists no replica URLs")
    return urls


@dataclass
class FleetSwap:
    """A swap committed on the replicas in `committed` as `policy_version`. `skipped` holds the
    replicas left out because they could not be reached (only with `skip_unreachable`):
    URL -> why."""

    policy_version: int
    committed: list[str]
    skipped: dict[str, str] = field(default_factory=dict)
    replies: dict[str, dict] = field(default_factory=dict)  # URL -> /commit_adapter's answer


class FleetSwapError(InferenceError):
    """A fleet swap that did not commit everywhere.

    `phase` is "prepare" (nothing was committed anywhere; `cancelled` lists the replicas whose
    prepared swap was dropped) or "commit" (`committed` lists the replicas now at
    `policy_version`; the replicas in `failed` are not). `failed`: URL -> why."""

    def __init__(self, message: str, *, phase: str, failed: dict[str, str], committed: list[str],
                 cancelled: list[str], policy_version: Optional[int] = None):
        super().__init__(message)
        self.phase = phase
        self.failed = failed
        self.committed = committed
        self.cancelled = cancelled
        self.policy_version = policy_version


class FleetClient:
    """Swaps the adapter of several mlxsup servers together (see the module's docstring).

    Args:
        urls: the replicas' base URLs (each server's own address, not the balancer's).
        api_key, admin_key: as for `InferenceClient`; the same keys for every replica.
        timeout: seconds for one replica's prepare or commit (a drain commit waits for the
            sequences in flight there).
        max_retries: retries of a refused connection or a 503, per call and replica; few, so a
            dead replica is reported quickly.
    """

    def __init__(self, urls: Iterable[str], *, api_key: Optional[str] = None,
                 admin_key: Optional[str] = None, timeout: float = 600.0, connect_timeout: float = 5.0,
                 max_retries: int = 2):
        self.urls = [u.rstrip("/") for u in urls]
        if not self.urls:
            raise ValueError("a fleet needs at least one replica URL")
        if len(set(self.urls)) != len(self.urls):
            raise ValueError("a replica URL is listed twice")
        self.clients = {u: InferenceClient(u, api_key=api_key, admin_key=admin_key, timeout=timeout,
                                           connect_timeout=connect_timeout, max_retries=max_retries,
                                           backoff_max=1.0)
                        for u in self.urls}

    @classmethod
    def from_file(cls, path: str, **kwargs: Any) -> "FleetClient":
        return cls(read_replicas(path), **kwargs)

    async def __aenter__(self) -> "FleetClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await asyncio.gather(*(c.aclose() for c in self.clients.values()))

    async def versions(self) -> dict[str, Any]:
        """URL -> the policy version it serves (GET /adapter), or the error as a string."""
        async def one(client):
            return (await client._request("GET", "/adapter", retries=0))["policy_version"]

        return dict(zip(self.urls, await _gather(one(self.clients[u]) for u in self.urls)))

    async def reload_adapter(self, adapter_path: Optional[str], *, mode: str = "drain",
                             ttl_s: Optional[float] = None, skip_unreachable: bool = False) -> FleetSwap:
        """Prepare `adapter_path` (a directory on every replica's file system, the same path
        on each; None: the base model) on every replica, then commit it on every replica in
        `mode` as one version. Raises `FleetSwapError` unless every replica committed.

        With `skip_unreachable`, a replica that gives no HTTP answer at all while preparing
        (down, or its port closed) is left out and reported in `FleetSwap.skipped`; the swap
        goes ahead on the others. A replica that answers with a refusal always fails it."""
        urls = self.urls
        prepared = await _gather(self.clients[u].prepare_adapter(adapter_path, ttl_s=ttl_s) for u in urls)
        skipped = {u: _why(r) for u, r in zip(urls, prepared)
                   if skip_unreachable and isinstance(r, ServerUnavailableError)}
        failed = {u: _why(r) for u, r in zip(urls, prepared) if isinstance(r, Exception) and u not in skipped}
        ready = {u: r for u, r in zip(urls, prepared) if not isinstance(r, Exception)}
        if failed or not ready:
            cancelled = await self._cancel(ready)
            failed = failed or skipped
            raise FleetSwapError(
                "fleet swap not committed anywhere: prepare failed on " + _listing(failed)
                + (f"; cancelled on {', '.join(cancelled)}" if cancelled else ""),
                phase="prepare", failed=failed, committed=[], cancelled=cancelled)
        version = max(r["next_policy_version"] for r in ready.values())
        committed = await _gather(self.clients[u].commit_adapter(r["prepared_id"], mode=mode, policy_version=version)
                                  for u, r in ready.items())
        replies = {u: c for u, c in zip(ready, committed) if not isinstance(c, Exception)}
        failed = {u: _why(c) for u, c in zip(ready, committed) if isinstance(c, Exception)}
        if failed:
            raise FleetSwapError(
                f"fleet split: version {version} committed on {', '.join(replies) or 'no replica'}; "
                f"not on {_listing(failed)}",
                phase="commit", failed=failed, committed=list(replies), cancelled=[], policy_version=version)
        return FleetSwap(policy_version=version, committed=list(replies), skipped=skipped, replies=replies)

    async def _cancel(self, ready: dict[str, dict]) -> list[str]:
        """Cancel the prepared swaps in `ready` (URL -> prepare answer); the URLs that did.
        One that cannot cancel drops it anyway after its ttl_s."""
        results = await _gather(self.clients[u].cancel_adapter(r["prepared_id"]) for u, r in ready.items())
        return [u for u, r in zip(ready, results) if not isinstance(r, Exception)]


async def _gather(calls) -> list:
    """Run `calls` at once; each result, or the InferenceError it raised."""
    async def one(call):
        try:
            return await call
        except InferenceError as e:
            return e

    return await asyncio.gather(*(one(c) for c in calls))


def _why(error: Exception) -> str:
    kind = getattr(error, "type", None)
    return f"{kind}: {error}" if kind else str(error)


def _listing(failed: dict[str, str]) -> str:
    return "; ".join(f"{u} ({why})" for u, why in failed.items())
