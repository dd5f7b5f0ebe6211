"""Too few eligible nodes: the error tells "no node reaches this server" from "the nodes are here but none has
a dataset with these tags" (a misspelled tag read exactly like a wrong port, after the whole node wait).
Real FedServer and node clients (experiment_harness)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from experiment_harness import federation, least_squares_sites

from fedcore.errors import RoundFailedError
from fedserver.eligible_nodes import eligible_nodes


def test_a_misspelled_tag_lists_the_connected_nodes_and_their_tags(tmp_path: Path) -> None:
    async def main():
        async with federation(tmp_path, least_squares_sites(2), tags=("cardio",)) as (server, _, _):
            await server.wait_for_nodes(2, 30)
            with pytest.raises(RoundFailedError) as info:
                await eligible_nodes(server, ["cardoi"], 1, 0.5)
            assert len(await eligible_nodes(server, ["cardio"], 2, 5)) == 2
            return str(info.value)

    message = asyncio.run(asyncio.wait_for(main(), timeout=60))
    assert message.startswith("only 0 connected node(s) have a dataset with all the tags ['cardoi'] ([]), "
                              "quorum is 1; waited 0.5 s. 2 node(s) are connected, their datasets' tags: "), message
    assert "site-0: ['cardio']" in message and "site-1: ['cardio']" in message, message


def test_no_node_at_all_says_where_the_nodes_should_connect(tmp_path: Path) -> None:
    async def main():
        async with federation(tmp_path, least_squares_sites(1), start_nodes=False) as (server, _, _):
            with pytest.raises(RoundFailedError) as info:
                await eligible_nodes(server, [], 1, 0.3)
            return str(info.value), server.port

    message, port = asyncio.run(asyncio.wait_for(main(), timeout=60))
    assert message == (f"only 0 connected node(s) ([]), quorum is 1; waited 0.3 s. No node is connected to this "
                       f"server (port {port}): check that the nodes run `fednode start --server HOST:{port}` "
                       "and can reach it")
