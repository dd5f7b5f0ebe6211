"""The held-out split's conformance vectors (tests/vectors/split/held_out.json), shared with the JS node.

Each case is ``(n, test_ratio, seed)`` with the held-out indices fedcore's split gives, the count, and the first
keys in hex (for someone debugging an implementation in another language). This file writes the vectors
(``python tests/test_split_vectors.py --write``) and checks that the committed file is what fedcore gives
today; ``clients/js/test/split.test.js`` checks the JavaScript node against the same file. The vectors sit in a
subfolder: the serialization vectors are every ``*.json`` directly in ``tests/vectors``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

from fedcore.plans.split import held_out_count, held_out_indices, split_keys

VECTORS = Path(__file__).resolve().parent / "vectors" / "split" / "held_out.json"

#: (n, test_ratio, seed): the docs' worked example, ratio 0, n 0 and 1, seeds 0, 2³²−1 (the largest a
#: TrainingArgs seed can be) and 2⁶⁴−1, ratios whose float product falls just below the count (0.29, 0.57 of
#: 100), and n around 1000.
CASES: list[tuple[int, float, int]] = [
    (10, 0.3, 1),
    (10, 0.0, 1),
    (0, 0.5, 1),
    (1, 0.0, 0),
    (1, 0.5, 3),
    (2, 0.5, 0),
    (100, 0.29, 0),
    (100, 0.29, 2**32 - 1),
    (100, 0.57, 12345),
    (50, 0.98, 7),
    (21, 1 / 3, 5),
    (64, 0.5, 2**64 - 1),
    (1000, 0.2, 42),
    (997, 0.29, 123456789),
]
FIRST_KEYS = 4


def vector_document() -> dict[str, Any]:
    cases = []
    for n, ratio, seed in CASES:
        _, held_out = held_out_indices(n, ratio, seed)
        cases.append({
            "n": n, "test_ratio": ratio, "seed": str(seed), "count": held_out_count(n, ratio),
            "first_keys": [f"{int(k):016x}" for k in split_keys(min(n, FIRST_KEYS), seed)],
            "held_out": held_out.tolist(),
        })
    return {
        "note": ("held-out split (docs/protocol.md section 6, 'The held-out split'): seed is a decimal string "
                 "(up to 2**64-1); first_keys are the keys of samples 0.. in hex; held_out ascending"),
        "cases": cases,
    }


def render(document: dict[str, Any]) -> str:
    """One case per line: diffs stay readable."""
    lines = [json.dumps(case, separators=(", ", ": ")) for case in document["cases"]]
    return ('{"note": ' + json.dumps(document["note"]) + ',\n "cases": [\n  ' + ",\n  ".join(lines) + "\n ]}\n")


def test_committed_vectors_are_what_fedcore_gives() -> None:
    assert VECTORS.read_text(encoding="utf-8") == render(vector_document()), (
        "run: python tests/test_split_vectors.py --write")


def test_vectors_parse_back_and_cover_the_edges() -> None:
    cases = json.loads(VECTORS.read_text(encoding="utf-8"))["cases"]
    assert [(c["n"], c["test_ratio"], int(c["seed"])) for c in cases] == CASES
    seeds = {int(c["seed"]) for c in cases}
    assert {0, 2**32 - 1, 2**64 - 1} <= seeds
    assert any(c["test_ratio"] == 0 for c in cases) and any(c["n"] == 1 for c in cases)
    assert any(c["n"] >= 997 for c in cases)
    for c in cases:
        assert len(c["held_out"]) == c["count"] and c["held_out"] == sorted(set(c["held_out"]))
        assert all(0 <= i < c["n"] for i in c["held_out"])
    by_case = {(c["n"], c["test_ratio"]): c["count"] for c in cases}
    assert by_case[(100, 0.29)] == 29 and by_case[(100, 0.57)] == 57  # counts of the ratio as written


def test_the_held_out_indices_are_those_of_the_smallest_keys() -> None:
    """An independent reading of the vectors: argsort of the keys, not the argpartition the split uses."""
    for c in json.loads(VECTORS.read_text(encoding="utf-8"))["cases"]:
        keys = split_keys(c["n"], int(c["seed"]))
        assert sorted(np.argsort(keys, kind="stable")[:c["count"]].tolist()) == c["held_out"], c


if __name__ == "__main__":
    if sys.argv[1:] != ["--write"]:
        sys.exit("usage: python tests/test_split_vectors.py --write")
    VECTORS.parent.mkdir(parents=True, exist_ok=True)
    VECTORS.write_text(render(vector_document()), encoding="utf-8")
    print(f"wrote {len(CASES)} cases to {VECTORS}")
