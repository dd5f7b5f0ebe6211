"""Which connected nodes can take part in a round or an evaluation: those with the experiment's dataset tags,
waited for until a quorum is there.

Kept apart from the Experiment: it is the one place that waits on the server's registry rather than on
tasks, and a round and an evaluation ask it the same question.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from fedcore.errors import RoundFailedError, StrategyError
from fedcore.strategies import AllNodes, ByTags, NodeInfo, NodeSelector
from fedserver.server import FedServer


async def eligible_nodes(server: FedServer, dataset_tags: Sequence[str], min_nodes: int,
                         wait_timeout: float, expected: int | None = None) -> list[NodeInfo]:
    """Connected nodes that have all ``dataset_tags``, waiting up to ``wait_timeout`` seconds for ``expected``
    of them (default ``min_nodes``: a node that connects a moment later would miss the round); at the end of
    the wait, at least ``min_nodes`` go on, fewer is a RoundFailedError naming the tags, the nodes and the
    quorum."""
    wanted = max(min_nodes, expected or 0)
    tags_filter = ByTags(dataset_tags) if dataset_tags else AllNodes()
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait_timeout
    while True:
        infos = server.registry.node_infos(connected_only=True)
        keep = set(_safe_select(tags_filter, infos))
        eligible = [i for i in infos if i.node_id in keep]
        remaining = deadline - loop.time()
        if len(eligible) >= wanted or remaining <= 0:
            break
        await server.wait_for_nodes(len(infos) + 1, min(remaining, 1.0))
    if len(eligible) < min_nodes:
        raise RoundFailedError(_shortfall(server, dataset_tags, min_nodes, wait_timeout, infos, eligible))
    return eligible


#: At most this many connected nodes are listed, with their datasets' tags, when too few are eligible.
LISTED_NODES = 10


def _shortfall(server: FedServer, dataset_tags: Sequence[str], min_nodes: int, wait_timeout: float,
               infos: list[NodeInfo], eligible: list[NodeInfo]) -> str:
    """Why too few nodes are eligible, telling apart "no node reaches this server" (wrong address or port, nodes
    not started) from "nodes are here but none has a dataset with these tags" (a misspelled tag)."""
    ids = [i.node_id for i in eligible]
    if dataset_tags:
        head = f"only {len(eligible)} connected node(s) have a dataset with all the tags {list(dataset_tags)} ({ids})"
    else:
        head = f"only {len(eligible)} connected node(s) ({ids})"
    message = f"{head}, quorum is {min_nodes}; waited {wait_timeout:g} s"
    if not infos:
        return (f"{message}. No node is connected to this server (port {server.port}): check that the nodes run "
                f"`fednode start --server HOST:{server.port}` and can reach it")
    if dataset_tags and len(infos) > len(eligible):
        listed = "; ".join(f"{i.node_id}: {_datasets_tags(i)}" for i in infos[:LISTED_NODES])
        more = f"; and {len(infos) - LISTED_NODES} more" if len(infos) > LISTED_NODES else ""
        message += f". {len(infos)} node(s) are connected, their datasets' tags: {listed}{more}"
    return message


def _datasets_tags(info: NodeInfo) -> str:
    per_dataset = info.dataset_tags if info.dataset_tags is not None else (info.tags,)
    return ", ".join(str(sorted(tags)) for tags in per_dataset) or "no datasets"


def _safe_select(selector: NodeSelector, infos: list[NodeInfo]) -> list[str]:
    """Ids a filter keeps; an empty candidate list or no match is an empty list, not an error."""
    try:
        return selector.select(infos, 0) if infos else []
    except StrategyError:
        return []
