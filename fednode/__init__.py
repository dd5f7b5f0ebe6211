"""fednode: the site side of fedstream, a gRPC client that dials out to the researcher's server.

- :class:`fednode.client.NodeClient` — the loop: register, long-poll, download, run, upload, reconnect;
- :class:`fednode.config.NodeConfig` — server address, TLS and identity, limits, backoff, keepalive;
- :mod:`fednode.handler` — the ``TaskHandler`` protocol, ``ReceivedTask``, ``TaskReply``, ``EchoHandler``;
- :func:`fednode.launch.run_node` — a client as a process's main job, stopped by SIGINT/SIGTERM;
- :mod:`fednode.cli` — the ``fednode`` command (``start``, ``dataset``, ``plans``).
"""
