"""Loopback TCP proxies between a node and the server, for tests that stage network failures.

:class:`TcpProxy` forwards every connection it accepts to the server's port, 64 KiB reads at a time, and
counts the bytes each way; its subclasses hook into each read and write to stage a failure:

* :class:`CuttingProxy` cuts every connection once the node has sent so many bytes (a network failure);
* :class:`PausingProxy` holds the server's bytes back once so many went through, until resumed (a slow
  download: the server's sends block meanwhile);
* :class:`FreezingProxy` stops forwarding either way while keeping both sockets open (a half-open
  connection: the node's machine died or its network vanished), and can thaw again.
"""

from __future__ import annotations

import asyncio

READ_SIZE = 64 * 1024


class TcpProxy:
    """Forwards loopback connections to ``target_port``; ``upstream_bytes`` (node -> server) and
    ``downstream_bytes`` (server -> node) count what was read each way. Subclasses override
    :meth:`_before_read` and :meth:`_before_write`; pipes they hold wait on ``_flowing``."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.upstream_bytes = 0
        self.downstream_bytes = 0
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._writers: list[asyncio.StreamWriter] = []
        self._server: asyncio.AbstractServer | None = None

    async def start(self) -> int:
        """Listens on a free loopback port and returns it."""
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return self._server.sockets[0].getsockname()[1]

    def cut(self) -> None:
        """Aborts both sockets of every connection so far."""
        for writer in self._writers:
            writer.transport.abort()
        self._writers.clear()

    async def stop(self) -> None:
        """Cuts every connection, lets held pipes see their closed sockets and end, stops listening."""
        self.cut()
        self._flowing.set()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _before_read(self, upstream: bool) -> None:
        """Called before each read of a pipe; may hold it."""

    async def _before_write(self, upstream: bool) -> bool:
        """Called with the counters updated, before forwarding a read; may hold it. False drops the read
        and ends the pipe."""
        return True

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        self._writers += [writer, up_writer]
        await asyncio.gather(self._pipe(reader, up_writer, upstream=True),
                             self._pipe(up_reader, writer, upstream=False), return_exceptions=True)

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, upstream: bool) -> None:
        try:
            while True:
                await self._before_read(upstream)
                data = await reader.read(READ_SIZE)
                if not data:
                    return
                if upstream:
                    self.upstream_bytes += len(data)
                else:
                    self.downstream_bytes += len(data)
                if not await self._before_write(upstream):
                    return
                writer.write(data)
                await writer.drain()
        finally:
            writer.close()


class CuttingProxy(TcpProxy):
    """Cuts every connection once the node has sent ``cut_after(n)`` more bytes; ``cuts`` counts the cuts."""

    def __init__(self, target_port: int) -> None:
        super().__init__(target_port)
        self.cuts = 0
        self._cut_at: int | None = None

    def cut_after(self, nbytes: int) -> None:
        self._cut_at = self.upstream_bytes + nbytes

    async def _before_write(self, upstream: bool) -> bool:
        if upstream and self._cut_at is not None and self.upstream_bytes >= self._cut_at:
            self._cut_at = None
            self.cuts += 1
            self.cut()
            return False
        return True


class PausingProxy(TcpProxy):
    """Holds the server's bytes back once ``pause_after(n)`` more went through (``paused`` is set then),
    until :meth:`resume`: the node's download stalls mid-task and the server's sends block meanwhile."""

    def __init__(self, target_port: int) -> None:
        super().__init__(target_port)
        self.paused = asyncio.Event()
        self._pause_at: int | None = None

    def pause_after(self, nbytes: int) -> None:
        self._pause_at = self.downstream_bytes + nbytes

    def resume(self) -> None:
        self._flowing.set()

    async def _before_write(self, upstream: bool) -> bool:
        if not upstream:
            if self._pause_at is not None and self.downstream_bytes >= self._pause_at:
                self._pause_at = None
                self._flowing.clear()
                self.paused.set()
            await self._flowing.wait()
        return True


class FreezingProxy(TcpProxy):
    """Once frozen, reads and forwards nothing either way but keeps both sockets open, which is how a node
    whose machine died or whose network vanished looks to the server (a half-open connection, until
    keepalive gives up on it); :meth:`thaw` lets the bytes flow again."""

    def freeze(self) -> None:
        self._flowing.clear()

    def thaw(self) -> None:
        self._flowing.set()

    async def _before_read(self, upstream: bool) -> None:
        await self._flowing.wait()  # frozen: nothing is read, so the sender's buffers fill

    async def _before_write(self, upstream: bool) -> bool:
        await self._flowing.wait()
        return True
