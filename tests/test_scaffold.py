"""Scaffold (option II): two rounds recomputed by hand, late nodes, errors, bit-identical resume."""

from __future__ import annotations

import numpy as np
import pytest

from fedcore import Serializer
from fedcore.aggregators import FedAverage, NodeReply, Scaffold, build_aggregator
from fedcore.errors import AggregationError


def params(w, b, dtype=np.float64) -> dict[str, np.ndarray]:
    return {"w": np.array(w, dtype=dtype), "b": np.array(b, dtype=dtype)}


def reply(node, p, n=10, k=1, lr=0.1) -> NodeReply:
    return NodeReply(node_id=node, params=p, num_samples=n, num_steps=k, lr=lr)


# -- Scaffold -----------------------------------------------------------------------------------------


def scaffold_state_arrays(agg: Scaffold) -> tuple[dict, dict]:
    state = agg.state()
    return state["server_control"], state["node_controls"]


def test_scaffold_two_rounds_with_partial_participation_by_hand():
    eta_g = 0.5
    agg = Scaffold(server_lr=eta_g)
    known = ["a", "b", "c"]
    n_known = 3
    x0 = params([1.0, -2.0], 0.5)
    zero = params([0.0, 0.0], 0.0)

    # Round 1, S = {a, b}; every control variate starts at 0, so every δ_i is 0.
    agg.begin_round(0, x0, ["a", "b"], known)
    for node in ("a", "b"):
        for key, delta in agg.node_task_state(node)["correction"].items():
            np.testing.assert_array_equal(delta, zero[key])
    y1 = {"a": params([0.6, -1.8], 0.3), "b": params([1.2, -2.4], 0.9)}
    steps1 = {"a": (2, 0.1), "b": (4, 0.05)}
    for node, y in y1.items():
        agg.accumulate(reply(node, y, k=steps1[node][0], lr=steps1[node][1]))
    x1 = agg.finalize()

    c0 = zero
    ci0 = {node: zero for node in known}
    ci1 = dict(ci0)
    for node, y in y1.items():  # c_i⁺ = c_i − c + (x − y_i) / (K η_l)
        k, lr = steps1[node]
        ci1[node] = {key: ci0[node][key] - c0[key] + (x0[key] - y[key]) / (k * lr) for key in x0}
    # the same written out: (x0 − y_a) / 0.2 and (x0 − y_b) / 0.2
    np.testing.assert_allclose(ci1["a"]["w"], [2.0, -1.0], rtol=1e-12)
    np.testing.assert_allclose(ci1["b"]["b"], -2.0, rtol=1e-12)
    expect_x1 = {
        key: x0[key] + eta_g * np.mean([y[key] - x0[key] for y in y1.values()], axis=0) for key in x0
    }
    expect_c1 = {
        key: c0[key] + (2 / n_known) * np.mean([ci1[i][key] - ci0[i][key] for i in y1], axis=0) for key in x0
    }
    np.testing.assert_allclose(x1["w"], [0.95, -2.05], rtol=1e-12)
    np.testing.assert_allclose(x1["b"], 0.55, rtol=1e-12)
    np.testing.assert_allclose(expect_c1["w"], [1 / 3, 1 / 3], rtol=1e-12)

    c, cis = scaffold_state_arrays(agg)
    for key in x0:
        np.testing.assert_allclose(x1[key], expect_x1[key], rtol=1e-12)
        np.testing.assert_allclose(c[key], expect_c1[key], rtol=1e-12)
        np.testing.assert_allclose(c[key], np.mean([cis[j][key] for j in known], axis=0), rtol=1e-12)
        for node in known:
            np.testing.assert_allclose(cis[node][key], ci1[node][key], rtol=1e-12)

    # Round 2, S = {b, c}: b receives c_b − c, c (never trained) receives 0 − c.
    agg.begin_round(1, x1, ["b", "c"], known)
    for node in ("b", "c"):
        sent = agg.node_task_state(node)["correction"]
        for key in x0:
            np.testing.assert_allclose(sent[key], ci1[node][key] - expect_c1[key], rtol=1e-12)
    np.testing.assert_allclose(agg.node_task_state("b")["correction"]["w"], [-4 / 3, 5 / 3], rtol=1e-12)
    with pytest.raises(AggregationError, match="'a' is not a participant"):
        agg.node_task_state("a")
    y2 = {"b": params([1.0, -2.0], 0.5), "c": params([0.75, -2.25], 0.65)}
    steps2 = {"b": (5, 0.1), "c": (1, 0.4)}
    for node, y in y2.items():
        agg.accumulate(reply(node, y, k=steps2[node][0], lr=steps2[node][1]))
    x2 = agg.finalize()

    ci2 = dict(ci1)
    for node, y in y2.items():
        k, lr = steps2[node]
        ci2[node] = {key: ci1[node][key] - expect_c1[key] + (x1[key] - y[key]) / (k * lr) for key in x0}
    expect_x2 = {
        key: x1[key] + eta_g * np.mean([y[key] - x1[key] for y in y2.values()], axis=0) for key in x0
    }
    expect_c2 = {
        key: expect_c1[key] + (2 / n_known) * np.mean([ci2[i][key] - ci1[i][key] for i in y2], axis=0)
        for key in x0
    }
    c, cis = scaffold_state_arrays(agg)
    for key in x0:
        np.testing.assert_allclose(x2[key], expect_x2[key], rtol=1e-12)
        np.testing.assert_allclose(c[key], expect_c2[key], rtol=1e-12, atol=1e-15)
        np.testing.assert_allclose(
            c[key], np.mean([cis[j][key] for j in known], axis=0), rtol=1e-12, atol=1e-15
        )
        np.testing.assert_array_equal(cis["a"][key], ci1["a"][key])  # a sat out: c_a unchanged
        for node in known:
            np.testing.assert_allclose(cis[node][key], ci2[node][key], rtol=1e-12)
    assert x2["w"].dtype == np.float64 and x2["b"].shape == ()


def test_scaffold_late_node_starts_at_c_and_keeps_c_the_mean():
    agg = Scaffold()
    x = params([0.0, 0.0], 0.0)
    agg.begin_round(0, x, ["a", "b"], ["a", "b"])
    agg.accumulate(reply("a", params([1.0, 2.0], 1.0), k=1, lr=1.0))
    agg.accumulate(reply("b", params([3.0, 0.0], 1.0), k=1, lr=1.0))
    x = agg.finalize()
    agg.begin_round(1, x, ["d"], ["a", "b", "d"])
    for delta in agg.node_task_state("d")["correction"].values():
        assert not delta.any()
    agg.accumulate(reply("d", params([5.0, 5.0], 5.0), k=2, lr=0.5))
    agg.finalize()
    c, cis = scaffold_state_arrays(agg)
    assert agg.known_nodes == ["a", "b", "d"]
    for key in x:
        np.testing.assert_allclose(c[key], np.mean([cis[j][key] for j in "abd"], axis=0), rtol=1e-12)


@pytest.mark.parametrize(("lr", "k"), [(None, 3), (0.1, 0)])
def test_scaffold_refuses_a_reply_without_lr_or_steps(lr, k):
    agg = Scaffold()
    agg.begin_round(0, params([0.0], 0.0), ["a"], ["a"])
    with pytest.raises(AggregationError, match="Scaffold needs the local learning rate and steps: node 'a'"):
        agg.accumulate(reply("a", params([1.0], 1.0), k=k, lr=lr))


def test_scaffold_refuses_a_model_that_changed_between_rounds():
    agg = Scaffold()
    agg.begin_round(0, params([0.0], 0.0), ["a"], ["a"])
    agg.accumulate(reply("a", params([1.0], 1.0)))
    agg.finalize()
    with pytest.raises(AggregationError, match=r"'w' is \(1,\) float64 in control variates, \(2,\) float64"):
        agg.begin_round(1, params([0.0, 0.0], 0.0), ["a"], ["a"])


def test_aggregators_do_not_mutate_or_alias_their_arguments():
    x = params([1.0, 2.0], 3.0)
    y = params([0.0, 0.0], 0.0)
    agg = Scaffold()
    agg.begin_round(0, x, ["a"], ["a"])
    x["w"][:] = 100.0  # the aggregator kept a copy of x
    agg.accumulate(reply("a", y, k=1, lr=1.0))
    out = agg.finalize()
    np.testing.assert_array_equal(out["w"], [0.0, 0.0])
    np.testing.assert_array_equal(y["w"], [0.0, 0.0])
    state = agg.state()
    with pytest.raises(ValueError, match="read-only"):
        state["server_control"]["w"][0] = 5.0


def float32_replies(rng, nodes, shape=(64,)):
    return {
        node: {
            "w": (rng.normal(size=shape) * 10.0 ** rng.integers(-3, 3)).astype(np.float32),
            "b": rng.normal(size=()).astype(np.float32),
        }
        for node in nodes
    }


def run_scaffold_rounds(agg, x, rounds, record):
    """Play ``rounds`` (list of (index, participants, known)) with replies drawn from a per-round seed."""
    for index, participants, known in rounds:
        agg.begin_round(index, x, participants, known)
        rng = np.random.default_rng(100 + index)
        ys = float32_replies(rng, participants)
        for node in participants:
            record.append(agg.node_task_state(node)["correction"]["w"].tobytes())
            agg.accumulate(
                NodeReply(node, ys[node], 10, int(rng.integers(1, 9)), float(rng.uniform(0.01, 0.5)))
            )
        x = agg.finalize()
        record.append(x["w"].tobytes() + x["b"].tobytes())
    return x


ROUNDS = [
    (0, ["a", "b"], ["a", "b", "c"]),
    (1, ["b", "c"], ["a", "b", "c"]),
    (2, ["a", "d"], ["a", "b", "c", "d"]),
    (3, ["c", "d", "b"], ["a", "b", "c", "d"]),
]


@pytest.mark.parametrize("through_serializer", [False, True])
def test_scaffold_resume_into_fresh_object_is_bit_identical(through_serializer):
    x0 = float32_replies(np.random.default_rng(1), ["x"])["x"]
    straight: list[bytes] = []
    agg = Scaffold(server_lr=0.9)
    run_scaffold_rounds(agg, x0, ROUNDS, straight)
    final_state = agg.state()

    resumed: list[bytes] = []
    first = Scaffold(server_lr=0.9)
    x_mid = run_scaffold_rounds(first, x0, ROUNDS[:2], resumed)
    state = first.state()
    if through_serializer:
        state = Serializer.loads(Serializer.dumps(state))
        x_mid = Serializer.loads(Serializer.dumps(x_mid))
    second = build_aggregator(first.name, first.config())
    second.load_state(state)
    run_scaffold_rounds(second, x_mid, ROUNDS[2:], resumed)

    assert resumed == straight
    again = second.state()
    assert again["known_nodes"] == final_state["known_nodes"] == ["a", "b", "c", "d"]
    for node in final_state["known_nodes"]:
        for key in ("w", "b"):
            assert (
                again["node_controls"][node][key].tobytes()
                == final_state["node_controls"][node][key].tobytes()
            )
    assert Serializer.dumps(again) == Serializer.dumps(final_state)


def test_load_state_checks_what_it_loads():
    agg = Scaffold()
    with pytest.raises(
        AggregationError, match="saved by aggregator 'fedavg', cannot load it into 'scaffold'"
    ):
        agg.load_state(FedAverage().state())
    bad = {
        "aggregator": "scaffold",
        "version": 1,
        "server_control": {"w": np.zeros(2)},
        "node_controls": {"a": {"w": np.zeros(3)}},
        "known_nodes": ["a"],
    }
    with pytest.raises(AggregationError, match=r"node 'a' does not match server_control.*'w'"):
        agg.load_state(bad)
    with pytest.raises(AggregationError, match=r"one entry per known node \['a', 'b'\]"):
        agg.load_state({**bad, "known_nodes": ["a", "b"]})
    with pytest.raises(
        AggregationError, match=r"unknown aggregator 'fedprox'; choices: \['fedavg', 'scaffold'\]"
    ):
        build_aggregator("fedprox", {})
    with pytest.raises(AggregationError, match="server_lr must be a finite float > 0"):
        build_aggregator("scaffold", {"server_lr": -1.0})
