"""Node selection: each selector, composition, determinism of RandomFraction, errors."""

from __future__ import annotations

import hashlib
import math
import random
from collections import Counter

import pytest

from fedcore.errors import StrategyError
from fedcore.strategies import AllNodes, ByIds, ByTags, NodeInfo, NodeSelector, RandomFraction

NODES = [
    NodeInfo("paris", {"mri", "adult"}, 120),
    NodeInfo("lyon", {"mri", "child"}, 80),
    NodeInfo("nice", {"ct", "adult"}),
    NodeInfo("lille", {"ct", "mri", "adult"}, 10),
    NodeInfo("brest", ()),
]


def many(n: int, tag_every: int = 2) -> list[NodeInfo]:
    return [NodeInfo(f"n{i:03d}", {"mri"} if i % tag_every == 0 else {"ct"}) for i in range(n)]


def test_all_nodes_returns_every_id_sorted():
    assert AllNodes().select(NODES, 0) == ["brest", "lille", "lyon", "nice", "paris"]


@pytest.mark.parametrize(
    ("selector", "expected"),
    [
        (ByTags({"mri"}), ["lille", "lyon", "paris"]),
        (ByTags("mri"), ["lille", "lyon", "paris"]),  # a bare str is one tag
        (ByTags({"mri", "adult"}), ["lille", "paris"]),
        (ByTags({"mri", "adult"}, match="any"), ["lille", "lyon", "nice", "paris"]),
        (ByTags({"child", "ct"}, match="any"), ["lille", "lyon", "nice"]),
        (ByIds(["nice", "brest"]), ["brest", "nice"]),
        (ByIds("lyon"), ["lyon"]),
        (AllNodes(base=ByTags({"ct"})), ["lille", "nice"]),
        (ByTags({"adult"}, base=ByTags({"mri"})), ["lille", "paris"]),
    ],
)
def test_filters(selector, expected):
    assert selector.select(NODES, 3) == expected


def test_by_tags_without_a_match_says_which_tags_and_candidates():
    with pytest.raises(StrategyError, match=r"ByTags\(\['pet'\].*selected no node among \['brest'"):
        ByTags({"pet"}).select(NODES, 0)


def test_by_ids_names_unknown_ids():
    with pytest.raises(StrategyError, match=r"node\(s\) \['rome', 'zurich'\] are not among the candidates"):
        ByIds(["paris", "zurich", "rome"]).select(NODES, 0)
    # an id the base filtered out is not a candidate either
    with pytest.raises(
        StrategyError, match=r"\['nice'\] are not among the candidates \['lille', 'lyon', 'paris'\]"
    ):
        ByIds(["nice", "paris"], base=ByTags({"mri"})).select(NODES, 0)


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: ByTags({"mri"}, match="most"), r"match must be one of \['all', 'any'\], got 'most'"),
        (lambda: ByTags(set()), "at least one tag"),
        (lambda: ByTags({"mri", 3}), "must hold non-empty str, got 3"),
        (lambda: ByIds([]), "at least one node id"),
        (lambda: RandomFraction(0.0, seed=1), r"fraction must be in \(0, 1\], got 0.0"),
        (lambda: RandomFraction(1.5, seed=1), r"fraction must be in \(0, 1\], got 1.5"),
        (lambda: RandomFraction(0.5, seed=1.5), "seed must be an int"),
        (lambda: RandomFraction(0.5, seed=1, min_nodes=0), "min_nodes must be an int >= 1"),
        (lambda: AllNodes(base="mri"), "base must be a NodeSelector"),
        (lambda: NodeInfo(""), "node_id must be a non-empty str"),
        (lambda: NodeInfo("a", num_samples=-3), "num_samples must be an int >= 0"),
    ],
)
def test_bad_configuration(build, message):
    with pytest.raises(StrategyError, match=message):
        build()


@pytest.mark.parametrize(
    ("candidates", "round_index", "message"),
    [
        ([], 0, "no candidate node"),
        ([NodeInfo("a"), NodeInfo("a")], 0, "'a' is listed twice"),
        (["a"], 0, "candidates must be NodeInfo, got str"),
        ([NodeInfo("a")], -1, "round_index must be an int >= 0"),
    ],
)
def test_bad_candidates(candidates, round_index, message):
    with pytest.raises(StrategyError, match=message):
        AllNodes().select(candidates, round_index)


# -- RandomFraction -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fraction", "n", "min_nodes", "k"),
    [(0.5, 10, 1, 5), (0.29, 100, 1, 29), (0.7, 10, 1, 7), (0.1, 3, 1, 1), (0.1, 30, 5, 5), (1.0, 7, 1, 7)],
)
def test_random_fraction_sample_size(fraction, n, min_nodes, k):
    chosen = RandomFraction(fraction, seed=0, min_nodes=min_nodes).select(many(n), 0)
    assert len(chosen) == k == max(min_nodes, math.floor(round(fraction * n, 9)))
    assert len(set(chosen)) == k and set(chosen) <= {info.node_id for info in many(n)}


def test_random_fraction_is_deterministic_and_independent_of_candidate_order():
    candidates = many(20)
    selector = RandomFraction(0.3, seed=42)
    reference = [selector.select(candidates, r) for r in range(10)]
    shuffled = list(candidates)
    random.Random(5).shuffle(shuffled)
    fresh = RandomFraction(0.3, seed=42)
    assert [fresh.select(shuffled, r) for r in range(10)] == reference
    assert shuffled != candidates and len(shuffled) == 20  # the argument order was ours, not sorted in place
    assert len({tuple(s) for s in reference}) > 5  # rounds differ
    other_seed = [RandomFraction(0.3, seed=43).select(candidates, r) for r in range(10)]
    assert other_seed != reference


def test_random_fraction_follows_the_documented_hash_rule():
    # k lowest SHA-256("{seed}\0{round}\0{node_id}") win: the rule a non-Python implementation can follow.
    candidates = many(12)
    seed, round_index, k = 7, 4, 4

    def score(node_id: str) -> bytes:
        return hashlib.sha256(f"{seed}\x00{round_index}\x00{node_id}".encode()).digest()

    expected = sorted(sorted((info.node_id for info in candidates), key=score)[:k])
    assert RandomFraction(k / 12, seed=seed).select(candidates, round_index) == expected


def test_random_fraction_picks_every_node_about_equally_often():
    candidates = many(10)
    selector = RandomFraction(0.3, seed=9)
    counts = Counter(node for r in range(3000) for node in selector.select(candidates, r))
    # each node is chosen with probability 0.3: 900 expected in 3000 rounds, sd ≈ 25
    assert set(counts) == {info.node_id for info in candidates}
    assert all(780 < count < 1020 for count in counts.values()), counts


def test_random_fraction_composes_with_tags():
    candidates = many(20, tag_every=2)  # n000, n002, ... n018 carry "mri"
    selector = RandomFraction(0.5, seed=1, base=ByTags({"mri"}))
    for r in range(5):
        chosen = selector.select(candidates, r)
        assert len(chosen) == 5
        assert all(int(node[1:]) % 2 == 0 for node in chosen)
    assert "base=ByTags(['mri']" in repr(selector)


def test_random_fraction_needs_min_nodes_candidates():
    with pytest.raises(StrategyError, match=r"at least min_nodes=3 candidates, got 2: \['lille', 'paris'\]"):
        RandomFraction(0.5, seed=0, min_nodes=3, base=ByTags({"mri", "adult"})).select(NODES, 0)


def test_custom_selector_that_chooses_nothing_is_an_error():
    class Nobody(NodeSelector):
        def _choose(self, candidates, round_index):
            return []

        def __repr__(self) -> str:
            return "Nobody()"

    with pytest.raises(StrategyError, match=r"Nobody\(\) selected no node"):
        Nobody().select(NODES, 0)


def test_node_info_normalises_tags():
    info = NodeInfo("a", ["x", "y", "x"])
    assert info.tags == frozenset({"x", "y"})
    assert NodeInfo("b", "mri").tags == frozenset({"mri"})
    assert NodeInfo("c").num_samples is None
