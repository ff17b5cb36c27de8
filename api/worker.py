"""gunicorn's native asgi worker, with a bound on how long a new connection may take to send its
request line and headers (`--header-timeout`).

gunicorn's asgi protocol times out an idle keep-alive connection and a slow body, but waits for
the *first* request head of a connection without limit: a client that sends half a header line
holds a connection (and a file descriptor) forever. Here the keep-alive timer that gunicorn
cancels once a request's head has been parsed is armed already when the connection opens; when
it fires, gunicorn closes the connection as it closes an idle keep-alive one."""

from __future__ import annotations

import logging

from gunicorn.asgi.protocol import ASGIProtocol
from gunicorn.workers import gasgi

from mlxsup.api.app import config_from_env

log = logging.getLogger("mlxsup.api")


class HeadTimeoutProtocol(ASGIProtocol):
    head_timeout_s: float = 15.0

    def connection_made(self, transport):
        super().connection_made(transport)
        if (getattr(self, "_callback_parser", None) is not None and not self._closed
                and getattr(self, "_keepalive_handle", False) is None):
            self._keepalive_handle = self.worker.loop.call_later(self.head_timeout_s,
                                                                 self._keepalive_timeout)


class ASGIWorker(gasgi.ASGIWorker):
    """`--worker-class mlxsup.api.worker.ASGIWorker`: gunicorn's asgi worker, whose server makes
    its connections with `HeadTimeoutProtocol` (the name gunicorn's worker module looks up)."""

    def init_process(self):
        HeadTimeoutProtocol.head_timeout_s = config_from_env().header_timeout_s
        if all(hasattr(ASGIProtocol, name) for name in ("_keepalive_timeout", "_cancel_keepalive_timer")):
            gasgi.ASGIProtocol = HeadTimeoutProtocol
        else:  # a gunicorn whose protocol changed: serve without the bound rather than fail
            log.warning("this gunicorn's asgi protocol has no keep-alive timer: no header timeout")
        super().init_process()
