"""The control sockets' JSON lines (mlxsup.ipc.jsonlines) over real socketpairs."""

from __future__ import annotations

import asyncio
import socket

import pytest

from mlxsup.ipc import jsonlines


def test_lines_split_across_reads_and_an_unterminated_last_line_arrive_whole():
    a, b = socket.socketpair()
    with a, b:
        a.sendall(jsonlines.encode({"op": "ready", "n": 1})[:5])
        a.sendall(jsonlines.encode({"op": "ready", "n": 1})[5:] + b"\n\n" + b'{"op": "last"}')
        a.shutdown(socket.SHUT_WR)
        lines = list(jsonlines.iter_lines(b))
    assert [jsonlines.decode(line) for line in lines] == [{"op": "ready", "n": 1}, {"op": "last"}]


def test_a_line_past_the_limit_is_an_error():
    a, b = socket.socketpair()
    with a, b:
        a.sendall(b"x" * 5000)
        a.shutdown(socket.SHUT_WR)
        with pytest.raises(ValueError, match="longer than 1000"):
            list(jsonlines.iter_lines(b, max_line=1000))


@pytest.mark.parametrize("line", [b"[1, 2]\n", b"{not json\n", b"\n", b"\xff\xfe\n"])
def test_anything_but_one_object_is_refused(line):
    with pytest.raises(ValueError):
        jsonlines.decode(line)


def test_async_reader_drops_an_overlong_line_and_reads_the_next():
    async def main():
        a, b = socket.socketpair()
        reader, writer = await asyncio.open_connection(sock=b, limit=1000)
        a.sendall(b'{"pad": "' + b"x" * 3000 + b'"}\n' + jsonlines.encode({"op": "swap_done"}))
        a.close()
        with pytest.raises(ValueError):
            await jsonlines.read_message(reader)
        assert await jsonlines.read_message(reader) == {"op": "swap_done"}
        assert await jsonlines.read_message(reader) is None
        writer.close()

    asyncio.run(main())
