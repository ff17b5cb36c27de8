"""KV of earlier prompts (and of finished sequences' prompt + completion) kept for later requests
whose token ids start with them, within one KV memory budget shared with the running batch.

The store is mlx-lm's `LRUPromptCache`: a trie over token ids per key, the nearest entry by
longest common prefix (exact, an entry that is a prefix of the tokens, or a longer one trimmed
back when every layer can be trimmed: `KVCache`, `QuantizedKVCache`, a `RotatingKVCache` that has
not wrapped), LRU eviction by bytes. A fetch hands back a deep copy, so no running row ever holds
an entry's arrays: every entry is evictable at any time, and evicting frees its memory at once.
Caches that cannot be trimmed (`ArraysCache` of SSM/hybrid layers, a wrapped rotating window) are
reused only as a whole, i.e. when the entry's tokens are a prefix of the new prompt.

Keys are the weights that computed the KV: (policy version, adapter identity, cache_salt). The
engine also drops every entry when a swap commits (`clear`), so KV of old weights is never
served and is freed at once (rows decoding under the old weights keep their own KV).
"""

from __future__ import annotations

from typing import Hashable, Optional, Sequence

from mlx_lm.models.cache import LRUPromptCache, can_trim_prompt_cache, trim_prompt_cache

# Entries at most; the bytes bound is the one that matters (LRUPromptCache defaults to 10).
MAX_ENTRIES = 1 << 16
# Default budget: this share of the memory left after the weights (see default_budget_bytes).
DEFAULT_SHARE = 0.5


def default_budget_bytes(weights_bytes: int) -> int:
    """The KV budget when `--kv-cache-gb` is not given: half of what the weights leave of the
    memory MLX may use. On a Mac that is Metal's recommended working set (about 75% of unified
    memory), so the batch plus the cache never pushes macOS into swap; elsewhere the device's
    memory (the machine's RAM for the CPU)."""
    import mlx.core as mx

    info = mx.device_info()
    total = info.get("max_recommended_working_set_size") or info.get("memory_size")
    if not total:
        import psutil

        total = psutil.virtual_memory().total
    return max(1 << 26, int(DEFAULT_SHARE * (int(total) - weights_bytes)))


class PrefixCache:
    """Entries of KV by (key, token ids), bounded by `max_bytes` (moved with `limit`). A match
    shorter than `min_tokens` is a miss: every prompt shares its BOS token with every entry,
    and starting from a few cached tokens costs a prompt its place in a batched prefill pass."""

    def __init__(self, max_bytes: int, min_tokens: int = 1):
        self.max_bytes = max_bytes
        self.min_tokens = max(1, min_tokens)
        self._store = self._new_store()
        self.reset_stats()

    def reset_stats(self) -> None:
        """Counters back to zero (the engine's warm-up leaves none of its lookups counted)."""
        self.num_lookups = 0
        self.num_hits = 0
        self.num_lookup_tokens = 0  # prompt tokens looked up
        self.num_hit_tokens = 0  # of them, served from the cache
        self.num_evictions = 0

    @property
    def num_entries(self) -> int:
        return len(self._store)

    @property
    def nbytes(self) -> int:
        return self._store.nbytes

    def fetch(self, key: Hashable, tokens: Sequence[int], limit: Optional[int] = None,
              new_lookup: bool = True) -> tuple[Optional[list], int]:
        """A private copy of the KV of the longest cached prefix of `tokens` (at most
        `len(tokens) - 1` of them when a longer entry is trimmed back, all of them on an exact
        match; at most `limit`) and its length; (None, 0) on a miss. `new_lookup` False: the
        second look of a prompt already counted as looked up."""
        tokens = list(tokens)
        if new_lookup:
            self.num_lookups += 1
            self.num_lookup_tokens += len(tokens)
        if not tokens or self.num_entries == 0:
            return None, 0
        cache, rest = self._store.fetch_nearest_cache(key, tokens)
        num = len(tokens) - len(rest)
        if cache is not None and limit is not None and num > limit:
            if not can_trim_prompt_cache(cache):
                cache = None
            else:
                trim_prompt_cache(cache, num - limit)
                num = limit
        if cache is None or num < self.min_tokens:
            return None, 0
        self.num_hits += 1
        self.num_hit_tokens += num
        return cache, num

    def insert(self, key: Hashable, tokens: Sequence[int], cache: list) -> None:
        """Keep `cache` (per-layer plain caches holding exactly `tokens`; owned by the store
        from now on), evicting the least recently used entries past the budget."""
        if self.max_bytes <= 0 or not tokens:
            return
        self._store.insert_cache(key, list(tokens), cache)
        self.limit(self.max_bytes)

    def limit(self, max_bytes: int) -> None:
        """Bound the cache to `max_bytes` from now on (what the running batch leaves of the
        budget), evicting least recently used entries now."""
        self.max_bytes = max(0, max_bytes)
        if self._store.nbytes > self.max_bytes:
            before = len(self._store)
            self._store.trim_to(n_bytes=self.max_bytes)
            self.num_evictions += before - len(self._store)

    def clear(self) -> int:
        """Drop every entry; the number dropped."""
        num = len(self._store)
        self._store = self._new_store()
        return num

    @staticmethod
    def _new_store() -> LRUPromptCache:
        # Its own bytes bound stays off: `limit` evicts, so evictions are counted.
        return LRUPromptCache(max_size=MAX_ENTRIES, max_bytes=1 << 62)

    def stats(self) -> dict:
        return dict(prefix_cache_lookups=self.num_lookups, prefix_cache_hits=self.num_hits,
                    prefix_cache_lookup_tokens=self.num_lookup_tokens,
                    prefix_cache_hit_tokens=self.num_hit_tokens,
                    prefix_cache_entries=self.num_entries, prefix_cache_bytes=self.nbytes,
                    prefix_cache_evictions=self.num_evictions)
