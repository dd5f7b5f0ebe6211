"""The processes of ``bench_transport.py``: a raw grpcio pair and a fedstream pair, one process per side.

Every role is a process target ``role(conn, spec)``: ``conn`` is its end of a pipe to the orchestrator,
``spec`` a dict (mode "download" = server → client/node, "upload" = client/node → server; ``size``
bytes; ``chunk`` bytes; ``transfers``: how many transfers the pair does back to back, ``gap`` seconds
apart, on the same connection and in the same processes — the first is a fresh process's, the next
ones the steady state of a node that receives the same-sized model every round; ``node_window`` /
``server_window``, when present, override the fedstream configs' ``receive_window_bytes`` defaults;
``no_pool`` turns both sides' receive-buffer pools off). A role sends dict messages whose ``*_at`` values are ``time.monotonic()``
stamps (CLOCK_MONOTONIC is system-wide on Linux, so stamps of different processes compare), from which
the orchestrator cuts its RSS windows and computes throughput.

The raw pair is the baseline: generic handlers with identity (de)serializers over ``bytes``, 1 MiB slices
of one preallocated ``bytes`` buffer, the receiver only counting (or, with ``spec["verify"]``, also
keeping and hashing the bytes, see :class:`RawSink`); ``spec["keep"]`` gives both processes fedstream's
glibc thresholds (:func:`fedcore.framing.memory.keep_chunk_memory`), for context. The fedstream pair is the real code:
``FedServer.dispatch`` / ``UploadResult`` on one side, ``fednode.client.NodeClient`` (its download into a
``ChunkAssembler``, digest check, decode in the worker, encode and upload of the reply) on the other.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

RAW_SERVICE = "bench.RawBytes"
MESSAGE_LIMIT = 64 << 20  # raw pair: generous gRPC message limits, chunks are 1 MiB
now = time.monotonic


# -- payload ---------------------------------------------------------------------------------------------
def make_params(nbytes: int, seed: int = 0) -> dict[str, np.ndarray]:
    """A model-like dict of float32 arrays totalling ``nbytes`` (4M-element matrices plus bias vectors)."""
    rng = np.random.default_rng(seed)
    params: dict[str, np.ndarray] = {}
    remaining = nbytes // 4
    layer = 0
    while remaining > 0:
        n = min(remaining, 4_000_000)
        shape = (n // 1000, 1000) if n % 1000 == 0 else (n,)
        params[f"layer{layer}.weight"] = rng.random(shape, dtype=np.float32)
        remaining -= n
        if remaining > 0:
            b = min(remaining, 1000)
            params[f"layer{layer}.bias"] = rng.random(b, dtype=np.float32)
            remaining -= b
        layer += 1
    return params


def array_digests(params: dict[str, Any]) -> dict[str, str]:
    """SHA-256 of each array's dtype, shape and bytes (no copy: hashes the array's own memory)."""
    out = {}
    for name, a in params.items():
        h = hashlib.sha256(f"{a.dtype.str}{a.shape}".encode())
        h.update(memoryview(np.ascontiguousarray(a)).cast("B"))
        out[name] = h.hexdigest()
    return out


def quiet_logs() -> None:
    logging.basicConfig(level=logging.ERROR)
    # the node stopping cancels its next long poll; grpc.aio logs that CancelledError as an error
    logging.getLogger("grpc._cython.cygrpc").setLevel(logging.CRITICAL)


# -- raw grpcio baseline -----------------------------------------------------------------------------------
class RawSink:
    """What a raw receiver does with each message: count it, or (``verify``) also keep it and hash it.

    The verifying sink is the least any receiver that keeps and checks the bytes must do, written with
    numpy and hashlib only: copy into one preallocated buffer, SHA-256 in a thread behind the copies.
    Given the ``buffer`` of an earlier transfer it writes into it again (the steady-state floor).
    """

    def __init__(self, size: int, verify: bool, buffer: memoryview | None = None) -> None:
        self.total = 0
        self.verify = verify
        if verify:
            import queue
            import threading

            self._buf = buffer if buffer is not None else memoryview(np.empty(size, dtype=np.uint8))
            self._hash = hashlib.sha256()
            self._ranges: queue.SimpleQueue[tuple[int, int] | None] = queue.SimpleQueue()
            self._hasher = threading.Thread(target=self._hash_ranges, daemon=True)
            self._hasher.start()

    def _hash_ranges(self) -> None:
        while (item := self._ranges.get()) is not None:
            self._hash.update(self._buf[item[0] : item[1]])

    def add(self, message: bytes) -> None:
        n = len(message)
        if self.verify:
            self._buf[self.total : self.total + n] = message
            self._ranges.put((self.total, self.total + n))
        self.total += n

    def close(self) -> None:
        if self.verify:
            self._ranges.put(None)
            self._hasher.join()
            self._hash.digest()


def _raw_setup(spec: dict[str, Any]) -> None:
    if spec.get("keep"):  # the same glibc thresholds as fedstream's processes (context, not the baseline)
        from fedcore.framing.memory import keep_chunk_memory

        keep_chunk_memory(spec["chunk"])


def raw_server(conn: Any, spec: dict[str, Any]) -> None:
    _raw_setup(spec)
    asyncio.run(_raw_server(conn, spec))


async def _raw_server(conn: Any, spec: dict[str, Any]) -> None:
    import grpc

    size, chunk = spec["size"], spec["chunk"]
    buf = np.random.default_rng(1).bytes(size) if spec["mode"] == "download" else b""
    received: dict[str, Any] = {"totals": []}
    kept: list[memoryview] = []  # r+v: the receive buffer, reused by the next transfer

    async def download(request: bytes, context: Any) -> Any:
        for offset in range(0, size, chunk):
            yield buf[offset : offset + chunk]

    async def upload(request_iterator: Any, context: Any) -> bytes:
        sink = RawSink(size, spec.get("verify", False), kept[0] if kept else None)
        async for message in request_iterator:
            sink.add(message)
        sink.close()
        if sink.verify and not kept:
            kept.append(sink._buf)
        received["totals"].append(sink.total)
        return sink.total.to_bytes(8, "little")

    server = grpc.aio.server(options=[("grpc.max_receive_message_length", MESSAGE_LIMIT),
                                      ("grpc.max_send_message_length", MESSAGE_LIMIT)])
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(RAW_SERVICE, {
        "Download": grpc.unary_stream_rpc_method_handler(download),
        "Upload": grpc.stream_unary_rpc_method_handler(upload),
    }),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    conn.send({"port": port, "ready_at": now()})
    await asyncio.get_running_loop().run_in_executor(None, conn.recv)  # the client is done
    conn.send({"received": received})
    await server.stop(1.0)


def raw_client(conn: Any, spec: dict[str, Any]) -> None:
    _raw_setup(spec)
    asyncio.run(_raw_client(conn, spec))


async def _raw_client(conn: Any, spec: dict[str, Any]) -> None:
    import grpc

    size, chunk = spec["size"], spec["chunk"]
    buf = np.random.default_rng(2).bytes(size) if spec["mode"] == "upload" else b""
    options = [("grpc.max_receive_message_length", MESSAGE_LIMIT), ("grpc.max_send_message_length", MESSAGE_LIMIT)]
    transfers: list[dict[str, Any]] = []
    kept: memoryview | None = None  # r+v: the receive buffer, reused by the next transfer
    async with grpc.aio.insecure_channel(f"127.0.0.1:{spec['port']}", options=options) as channel:
        await channel.channel_ready()
        await asyncio.sleep(0.1)  # a settled baseline RSS sample before the transfer
        for i in range(spec.get("transfers", 1)):
            if i:
                await asyncio.sleep(spec.get("gap", 0.0))
            if spec["mode"] == "download":
                call = channel.unary_stream(f"/{RAW_SERVICE}/Download")(b"")
                t0 = now()
                sink = RawSink(size, spec.get("verify", False), kept)
                async for message in call:
                    sink.add(message)
                sink.close()
                total = sink.total
                kept = sink._buf if sink.verify else None
            else:
                call = channel.stream_unary(f"/{RAW_SERVICE}/Upload")()
                t0 = now()
                for offset in range(0, size, chunk):
                    await call.write(buf[offset : offset + chunk])
                await call.done_writing()
                total = int.from_bytes(await call, "little")
            transfers.append({"start_at": t0, "end_at": now(), "bytes": total})
    conn.send({"transfers": transfers})


# -- fedstream ------------------------------------------------------------------------------------------
def fed_server(conn: Any, spec: dict[str, Any]) -> None:
    quiet_logs()
    asyncio.run(_fed_server(conn, spec))


async def _fed_server(conn: Any, spec: dict[str, Any]) -> None:
    from fedcore.wire import TaskKind
    from fedserver.auth import NodeStore
    from fedserver.config import ServerConfig
    from fedserver.server import FedServer

    mode, size, chunk = spec["mode"], spec["size"], spec["chunk"]
    with tempfile.TemporaryDirectory() as tmp:
        store = NodeStore(Path(tmp) / "nodes.sqlite")
        token = store.enroll("bench-node")
        window = {"receive_window_bytes": spec["server_window"]} if "server_window" in spec else {}
        pool = {"upload_pool_bytes": 0} if spec.get("no_pool") else {}
        server = FedServer(ServerConfig(port=0, tls="insecure", chunk_size=chunk, max_payload_size=8 << 30,
                                        max_poll_wait_seconds=60.0, **window, **pool), store)
        info: dict[str, Any] = {}
        if mode == "download":
            params = make_params(size)
            info["digests"] = array_digests(params)
            t = now()
            payload = server.encode_payload({"params": params, "round": 1})
            info["encode_s"] = now() - t
            del params  # the server keeps the encoded document, as for a round (its arrays are views)
        else:
            payload = server.encode_payload({"round": 1, "reply_size": size})
        info["payload_size"] = payload.total_size
        port = await server.start()
        conn.send({"port": port, "token": token})
        [node_id] = await server.wait_for_nodes(1, timeout=120)
        transfers: list[dict[str, Any]] = []
        for i in range(spec.get("transfers", 1)):
            if i:
                await asyncio.sleep(spec.get("gap", 0.0))
            while server.registry.get(node_id).open_polls == 0:  # let the node's long poll be waiting
                await asyncio.sleep(0.01)
            await asyncio.sleep(0.1)  # a settled baseline RSS sample on both sides
            one: dict[str, Any] = {"start_at": now()}
            handle = server.dispatch(node_id, TaskKind.TRAIN, payload, experiment_id="bench", round=i + 1)
            result = await handle.result(timeout=3600)
            one["end_at"] = now()
            if not result.succeeded:
                raise RuntimeError(f"bench task ended {result.outcome}: {result.error_message}")
            one["upload_started_at"] = result.timings.upload_started_at
            one["finished_at"] = result.timings.finished_at
            if mode == "upload":
                one["digests"] = array_digests(result.payload["params"])
                one["result_size"] = result.bytes_received
            one["verified_at"] = now()
            del result, handle  # the result is aggregated and dropped, as in a round
            transfers.append(one)
        info["transfers"] = transfers
        info["pool"] = server.uploads.pool.stats().__dict__
        del payload
        await server.stop(1.0)
        conn.send(info)


def fed_node(conn: Any, spec: dict[str, Any]) -> None:
    quiet_logs()
    asyncio.run(_fed_node(conn, spec))


async def _fed_node(conn: Any, spec: dict[str, Any]) -> None:
    from fednode.client import NodeClient
    from fednode.config import NodeConfig
    from fednode.handler import ReceivedTask, TaskReply

    mode, size, chunk = spec["mode"], spec["size"], spec["chunk"]
    count = spec.get("transfers", 1)
    info: dict[str, Any] = {}
    transfers: list[dict[str, Any]] = []
    reply: dict[str, Any] = {"ok": True}
    if mode == "upload":
        params = make_params(size, seed=3)
        info["digests"] = array_digests(params)
        reply = {"params": params, "num_samples": 1}

    class BenchHandler:
        def handle(self, task: ReceivedTask, reporter: Any) -> TaskReply:
            one: dict[str, Any] = {"handled_at": now()}
            if mode == "download":
                one["digests"] = array_digests(task.payload["params"])
            one["handler_done_at"] = now()
            transfers.append(one)
            return TaskReply.succeeded(reply)

    config = NodeConfig(server=f"127.0.0.1:{spec['port']}", tls="insecure", token=spec["token"],
                        node_name="bench-node", upload_chunk_size=chunk, poll_wait_seconds=60.0,
                        max_payload_size=8 << 30,
                        **({"receive_window_bytes": spec["node_window"]} if "node_window" in spec else {}),
                        **({"receive_pool_bytes": 0} if spec.get("no_pool") else {}))
    client = NodeClient(config, BenchHandler())
    runner = asyncio.create_task(client.run())
    while client.results_delivered < count and not runner.done():
        await asyncio.sleep(0.01)
    info["delivered_at"] = now()
    client.stop()
    await runner
    info["transfers"] = transfers
    info["pool"] = client.receive_pool.stats().__dict__
    info["window"], info["rtt"] = client.receive_window, client.link_rtt  # what "auto" chose, from what
    conn.send(info)
