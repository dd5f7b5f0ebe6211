"""NodeStore answers token checks from a cache that any commit to the file empties (the CLI included)."""

from __future__ import annotations

from pathlib import Path

from fedserver.auth import NodeStore


def test_a_cached_token_stops_working_as_soon_as_another_store_revokes_it(tmp_path: Path) -> None:
    server_side, cli_side = NodeStore(tmp_path / "nodes.db"), NodeStore(tmp_path / "nodes.db")
    token = server_side.enroll("site-1")
    assert server_side.lookup(token) == "site-1"
    assert server_side.lookup(token) == "site-1"  # now cached
    assert not server_side.is_revoked("site-1")
    cli_side.revoke("site-1")
    assert server_side.lookup(token) is None
    assert server_side.is_revoked("site-1")
    new_token = cli_side.enroll("site-1")  # enrolling again replaces the token and lifts the revocation
    assert server_side.lookup(token) is None
    assert server_side.lookup(new_token) == "site-1"
    assert not server_side.is_revoked("site-1")
    server_side.close()
    cli_side.close()


def test_own_writes_empty_the_cache_too(tmp_path: Path) -> None:
    store = NodeStore(tmp_path / "nodes.db")
    tokens = store.enroll_many(["a", "b", "c"])
    assert [store.lookup(tokens[n]) for n in "abc"] == ["a", "b", "c"]
    store.revoke("b")
    assert [store.lookup(tokens[n]) for n in "abc"] == ["a", None, "c"]
    assert store.lookup("fsn1_not-a-token") is None
    assert not store.is_revoked("nobody")
    store.close()
    assert store.lookup(tokens["a"]) == "a", "a closed store reopens its read connection"
    store.close()
