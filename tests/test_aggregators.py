"""Aggregators: FedAverage and Scaffold maths recomputed in numpy, validation errors, determinism, resume."""

from __future__ import annotations

import itertools
import tracemalloc

import numpy as np
import pytest

from fedcore import Serializer
from fedcore.aggregators import FedAverage, NodeReply, Scaffold, build_aggregator
from fedcore.errors import AggregationError


def params(w, b, dtype=np.float64) -> dict[str, np.ndarray]:
    return {"w": np.array(w, dtype=dtype), "b": np.array(b, dtype=dtype)}


def reply(node, p, n=10, k=1, lr=0.1) -> NodeReply:
    return NodeReply(node_id=node, params=p, num_samples=n, num_steps=k, lr=lr)


# -- FedAverage ---------------------------------------------------------------------------------------


def test_fedavg_weighted_mean_on_hand_numbers():
    agg = FedAverage()
    agg.begin_round(0, params([0.0, 0.0], 0.0), ["a", "b", "c"], ["a", "b", "c"])
    agg.accumulate(reply("a", params([1.0, 2.0], 3.0), n=1))
    agg.accumulate(reply("b", params([3.0, 6.0], -1.0), n=3))
    agg.accumulate(reply("c", params([0.0, 4.0], 1.0), n=4))
    out = agg.finalize()
    # (1*[1,2] + 3*[3,6] + 4*[0,4]) / 8 = [10, 36] / 8 ; (3 - 3 + 4) / 8
    np.testing.assert_array_equal(out["w"], [1.25, 4.5])
    np.testing.assert_array_equal(out["b"], 0.5)
    assert out["b"].shape == ()


def test_fedavg_partial_replies_average_only_what_arrived():
    agg = FedAverage()
    agg.begin_round(3, params([0.0], 0.0), ["a", "b", "c"], ["a", "b", "c"])
    agg.accumulate(reply("a", params([2.0], 2.0), n=2))
    agg.accumulate(reply("c", params([5.0], -4.0), n=1))
    out = agg.finalize()
    np.testing.assert_array_equal(out["w"], [3.0])
    np.testing.assert_array_equal(out["b"], 0.0)


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_fedavg_preserves_float_dtype(dtype):
    rng = np.random.default_rng(0)
    ys = [rng.normal(size=(3, 4)).astype(dtype) for _ in range(3)]
    ns = [5, 7, 11]
    agg = FedAverage()
    agg.begin_round(0, {"w": np.zeros((3, 4), dtype)}, ["a", "b", "c"], ["a", "b", "c"])
    for node, y, n in zip("abc", ys, ns, strict=True):
        agg.accumulate(NodeReply(node, {"w": y}, n, 1))
    out = agg.finalize()["w"]
    assert out.dtype == np.dtype(dtype) and out.shape == (3, 4)
    expected = sum(n * y.astype(np.float64) for n, y in zip(ns, ys, strict=True)) / sum(ns)
    np.testing.assert_array_equal(out, expected.astype(dtype))


def test_fedavg_rounds_integer_params_to_nearest():
    agg = FedAverage()
    agg.begin_round(0, {"steps": np.array([0, 0], np.int64)}, ["a", "b"], ["a", "b"])
    agg.accumulate(NodeReply("a", {"steps": np.array([1, 10], np.int64)}, 1, 1))
    agg.accumulate(NodeReply("b", {"steps": np.array([2, 20], np.int64)}, 3, 1))
    out = agg.finalize()["steps"]  # [1.75, 17.5] -> [2, 18]
    assert out.dtype == np.int64
    np.testing.assert_array_equal(out, [2, 18])


def test_fedavg_memory_does_not_grow_with_replies():
    size = 100_000
    agg = FedAverage()
    agg.begin_round(
        0, {"w": np.zeros(size, np.float32)}, [f"n{i}" for i in range(40)], [f"n{i}" for i in range(40)]
    )
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        for i in range(40):
            agg.accumulate(NodeReply(f"n{i}", {"w": np.full(size, i, np.float32)}, 1, 1))
        held = tracemalloc.get_traced_memory()[0] - base
    finally:
        tracemalloc.stop()
    # 40 kept replies would be 16 MB; the running sums are one float64 model (0.8 MB).
    assert held < 4 * size * 4, held
    np.testing.assert_array_equal(agg.finalize()["w"], np.full(size, 19.5, np.float32))


# -- errors (both aggregators share the checks) ---------------------------------------------------------


@pytest.fixture(params=[FedAverage, Scaffold])
def open_agg(request):
    agg = request.param()
    agg.begin_round(0, params([0.0, 0.0], 0.0), ["a", "b"], ["a", "b", "c"])
    return agg


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ({"w": np.zeros(2), "b": np.zeros(()), "extra": np.zeros(1)}, r"'a'.*unknown parameter.*'extra'"),
        ({"w": np.zeros(2)}, r"'a' did not send parameter.*'b'"),
        ({"w": np.zeros(3), "b": np.zeros(())}, r"'a'.*'w' has shape \(3,\), expected \(2,\)"),
        ({"w": np.zeros(2, np.float32), "b": np.zeros(())}, r"'a'.*'w' has dtype float32, expected float64"),
        ({"w": np.array([0.0, np.nan]), "b": np.zeros(())}, r"'a'.*'w' contains NaN"),
    ],
)
def test_reply_that_does_not_match_the_model_is_rejected(open_agg, bad, message):
    with pytest.raises(AggregationError, match=message):
        open_agg.accumulate(reply("a", bad))
    open_agg.accumulate(reply("a", params([1.0, 1.0], 1.0)))  # the bad reply left no trace
    np.testing.assert_array_equal(open_agg.finalize()["w"], [1.0, 1.0])


def test_duplicate_and_foreign_replies_are_rejected(open_agg):
    open_agg.accumulate(reply("a", params([1.0, 1.0], 1.0)))
    with pytest.raises(AggregationError, match=r"'a' already replied in round 0"):
        open_agg.accumulate(reply("a", params([1.0, 1.0], 1.0)))
    with pytest.raises(AggregationError, match=r"'c' is not a participant of round 0"):
        open_agg.accumulate(reply("c", params([1.0, 1.0], 1.0)))
    with pytest.raises(AggregationError, match=r"'zz' is not a participant"):
        open_agg.node_task_state("zz")


def test_finalize_without_reply_and_lifecycle_errors(open_agg):
    with pytest.raises(AggregationError, match="no reply"):
        open_agg.finalize()
    with pytest.raises(AggregationError, match="round 0 is open"):
        open_agg.state()
    open_agg.abort_round()
    with pytest.raises(AggregationError, match="no round is open"):
        open_agg.accumulate(reply("a", params([1.0, 1.0], 1.0)))
    with pytest.raises(AggregationError, match="no round is open"):
        open_agg.finalize()
    assert open_agg.state()["aggregator"] == open_agg.name


def test_fedavg_zero_total_samples_is_an_error():
    agg = FedAverage()
    agg.begin_round(0, params([0.0], 0.0), ["a"], ["a"])
    agg.accumulate(reply("a", params([1.0], 1.0), n=0))
    with pytest.raises(AggregationError, match="num_samples=0"):
        agg.finalize()


def test_begin_round_validation():
    agg = FedAverage()
    with pytest.raises(AggregationError, match=r"participant 'x' is not among the known nodes"):
        agg.begin_round(0, params([0.0], 0.0), ["x"], ["a"])
    with pytest.raises(AggregationError, match=r"'a' is listed twice"):
        agg.begin_round(0, params([0.0], 0.0), ["a", "a"], ["a"])
    with pytest.raises(AggregationError, match="round_index"):
        agg.begin_round(-1, params([0.0], 0.0), ["a"], ["a"])
    with pytest.raises(AggregationError, match=r"'flag' of dtype bool"):
        agg.begin_round(0, {"flag": np.zeros(2, bool)}, ["a"], ["a"])
    with pytest.raises(AggregationError, match=r"Scaffold cannot aggregate.*'steps' of dtype int64"):
        Scaffold().begin_round(0, {"steps": np.zeros(2, np.int64)}, ["a"], ["a"])


def test_node_reply_freezes_its_mappings_and_takes_numpy_scalars_as_0d_arrays():
    source = {"w": np.zeros(2), "b": np.float32(1.5)}
    rep = NodeReply("a", source, np.int64(3), 2, 0.5, {"loss": np.float32(0.25)})
    source["extra"] = np.zeros(1)
    assert sorted(rep.params) == ["b", "w"]
    assert isinstance(rep.params["b"], np.ndarray) and rep.params["b"].shape == ()
    assert rep.params["b"].dtype == np.float32
    assert type(rep.num_samples) is int and rep.metrics == {"loss": 0.25}
    with pytest.raises(TypeError):
        rep.params["w"] = np.ones(2)  # type: ignore[index]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_samples": -1}, "num_samples must be an int >= 0"),
        ({"num_samples": True}, "num_samples must be an int >= 0"),
        ({"num_steps": 1.5}, "num_steps must be an int >= 0"),
        ({"lr": 0.0}, "lr must be a finite float > 0"),
        ({"lr": float("nan")}, "lr must be a finite float > 0"),
        ({"params": {"w": [1.0]}}, "'w' must be a numpy array, got list"),
        ({"node_id": ""}, "node_id must be a non-empty str"),
        ({"metrics": {"loss": "low"}}, "metric 'loss'"),
    ],
)
def test_node_reply_validation(kwargs, message):
    fields = {"node_id": "a", "params": {"w": np.zeros(1)}, "num_samples": 1, "num_steps": 1, "lr": 0.1}
    with pytest.raises(AggregationError, match=message):
        NodeReply(**{**fields, **kwargs})


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


# -- determinism and resume ---------------------------------------------------------------------------


def float32_replies(rng, nodes, shape=(64,)):
    return {
        node: {
            "w": (rng.normal(size=shape) * 10.0 ** rng.integers(-3, 3)).astype(np.float32),
            "b": rng.normal(size=()).astype(np.float32),
        }
        for node in nodes
    }


@pytest.mark.parametrize("make", [FedAverage, lambda: Scaffold(server_lr=0.7)])
def test_result_does_not_depend_on_reply_order_for_float32(make):
    rng = np.random.default_rng(7)
    nodes = ["a", "b", "c", "d", "e"]
    x = float32_replies(rng, ["x"])["x"]
    ys = float32_replies(rng, nodes)
    meta = {
        node: (int(rng.integers(1, 1000)), int(rng.integers(1, 50)), float(rng.uniform(1e-3, 1)))
        for node in nodes
    }
    outputs = set()
    for order in itertools.islice(itertools.permutations(nodes), 0, 120, 7):
        agg = make()
        agg.begin_round(0, x, nodes, nodes)
        for node in order:
            n, k, lr = meta[node]
            agg.accumulate(NodeReply(node, ys[node], n, k, lr))
        out = agg.finalize()
        blob = b"".join(out[key].tobytes() for key in sorted(out))
        if isinstance(agg, Scaffold):
            c, cis = scaffold_state_arrays(agg)
            blob += b"".join(arr[key].tobytes() for arr in [c, *cis.values()] for key in sorted(arr))
        outputs.add(blob)
    assert len(outputs) == 1


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
