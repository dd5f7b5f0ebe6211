"""Aggregators: FedAverage maths by hand, the checks every aggregator shares, reply-order independence.

Scaffold's maths and resume are in test_scaffold.py."""

from __future__ import annotations

import itertools
import tracemalloc

import numpy as np
import pytest

from fedcore.aggregators import FedAverage, NodeReply, Scaffold
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


# -- determinism ---------------------------------------------------------------------------------------


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
            state = agg.state()
            c, cis = state["server_control"], state["node_controls"]
            blob += b"".join(arr[key].tobytes() for arr in [c, *cis.values()] for key in sorted(arr))
        outputs.add(blob)
    assert len(outputs) == 1
