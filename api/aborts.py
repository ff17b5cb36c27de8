"""Cross-worker aborts: `POST /abort` may land on any API worker, the request on another.

The worker that receives the abort posts the request id on a board, a directory in the run
directory (`aborts/`, one file per id, named by its hash); every worker's engine link polls the
directory's mtime on its watch tick and aborts its own requests whose id is posted. Entries
expire after `TTL_S`. A stat per tick is the whole cost while nothing is posted.
"""

from __future__ import annotations

import hashlib
import os
import time
from typing import Optional

TTL_S = 60.0


def tag_key(tag: str) -> str:
    return hashlib.sha256(tag.encode("utf-8", "surrogatepass")).hexdigest()[:32]


class AbortBoard:
    def __init__(self, run_dir: str):
        self.path = os.path.join(run_dir, "aborts")
        self._seen_mtime: Optional[int] = None

    def post(self, tag: str) -> None:
        os.makedirs(self.path, mode=0o700, exist_ok=True)
        key = tag_key(tag)
        tmp = os.path.join(self.path, f".{key}.{os.getpid()}")
        with open(tmp, "w") as f:
            f.write(str(time.time()))
        os.replace(tmp, os.path.join(self.path, key))  # a rename always moves the dir's mtime

    def changed(self) -> Optional[dict]:
        """{key: posted_at} when the board changed since the last call, else None."""
        try:
            mtime = os.stat(self.path).st_mtime_ns
        except FileNotFoundError:
            return None
        if mtime == self._seen_mtime:
            return None
        self._seen_mtime = mtime
        return self.entries()

    def entries(self) -> dict:
        now = time.time()
        out = {}
        try:
            names = os.listdir(self.path)
        except FileNotFoundError:
            return out
        for name in names:
            if name.startswith("."):
                continue
            full = os.path.join(self.path, name)
            try:
                posted = os.stat(full).st_mtime
            except FileNotFoundError:
                continue
            if now - posted > TTL_S:
                try:
                    os.unlink(full)
                except OSError:
                    pass
                continue
            out[name] = posted
        return out
