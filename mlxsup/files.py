"""Files other processes read while they are rewritten (the run directory's state, layout,
config, pid and children files): written to a temporary file, fsynced, renamed over, so a
reader sees the old content or the new, never half."""

from __future__ import annotations

import json
import os
from typing import Optional, Union


def write_atomic(path: str, content: Union[str, bytes], *, private: bool = False) -> None:
    """Replace `path` by `content`. `private`: mode 0600 whatever the umask (secrets)."""
    tmp = f"{path}.{os.getpid()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if private else 0o666)
    try:
        if private:
            os.fchmod(fd, 0o600)  # a temporary file left by a killed writer may have another mode
        with os.fdopen(fd, "wb") as f:
            fd = -1
            f.write(content.encode() if isinstance(content, str) else content)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if fd >= 0:
            os.close(fd)
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def write_json_atomic(path: str, data, *, private: bool = False, indent: int = 1, **dumps) -> None:
    """`write_atomic` of `json.dumps(data)` (`dumps`: json.dumps's other options)."""
    write_atomic(path, json.dumps(data, indent=indent, **dumps), private=private)


def directory_problem(path: str, what: str = "adapter path") -> Optional[tuple[str, str]]:
    """What is wrong with `path` as a directory to read (an adapter, a weight update), as
    (error type, message), or None when it is one. The API, the supervisor and the engine each
    check a swap's path (each may be the first to see it) and must word it the same way."""
    if not os.path.exists(path):
        return "not_found", f"{what} {path} does not exist"
    if not os.path.isdir(path):
        return "invalid_adapter", f"{what} {path} is not a directory"
    return None
