"""Persistent buffers (BatchNorm running statistics) in the aggregators: FedAvg's exact integer rule
x⁺ = round_half_even(Σ n_i y_i / Σ n_i) recomputed with Python integers, and Scaffold, whose control variates and
corrections cover the trainable parameters only while buffers get the sample-weighted mean."""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest

from fedcore import Serializer
from fedcore.aggregators import FedAverage, NodeReply, Scaffold, build_aggregator
from fedcore.errors import AggregationError


def exact_weighted_mean(ys: list[np.ndarray], ns: list[int], dtype: np.dtype) -> np.ndarray:
    """Σ n_i y_i / Σ n_i per element with Fractions, rounded half to even (Python's round on a Fraction)."""
    flat = [np.asarray(y).reshape(-1) for y in ys]
    out = [round(Fraction(sum(n * int(y[j]) for n, y in zip(ns, flat, strict=True)), sum(ns)))
           for j in range(flat[0].size)]
    return np.array(out, dtype=object).astype(dtype).reshape(np.asarray(ys[0]).shape)


def fedavg(agg: FedAverage, replies: dict[str, tuple[dict, int]], x: dict) -> dict[str, np.ndarray]:
    agg.begin_round(1, x, list(replies), list(replies), buffers=[k for k in x if k != "w"])
    for node, (params, n) in replies.items():
        agg.accumulate(NodeReply(node, params, n, 1))
    return agg.finalize()


@pytest.mark.parametrize("accumulator", ["float64", "param_dtype"])
def test_fedavg_integer_buffers_are_the_exact_weighted_mean_rounded_half_to_even(accumulator: str) -> None:
    top = np.iinfo(np.int64).max
    ys = {  # near int64's limits: float64 (53-bit mantissa) would round them, int64 sums would overflow
        "a": np.array([top, top - 1, -top, 7, 1, 2**53 + 1], np.int64),
        "b": np.array([top - 2, top, -top + 3, 8, 2, 2**53 + 2], np.int64),
        "c": np.array([top - 5, top - 3, -top, 8, 1, 2**53 + 1], np.int64),
    }
    ns = {"a": 3, "b": 5, "c": 2**40}
    x = {"w": np.zeros(2, np.float32), "num_batches_tracked": np.zeros(6, np.int64)}
    replies = {node: ({"w": np.ones(2, np.float32), "num_batches_tracked": y}, ns[node]) for node, y in ys.items()}
    got = fedavg(FedAverage(accumulator=accumulator), replies, x)["num_batches_tracked"]
    expected = exact_weighted_mean(list(ys.values()), list(ns.values()), np.dtype(np.int64))
    assert got.dtype == np.int64
    np.testing.assert_array_equal(got, expected)
    assert int(got[5]) == 2**53 + 1 and int(np.float64(2**53 + 1)) != 2**53 + 1  # float64 cannot hold it
    assert got[0] == top - 5  # 2⁴⁰ weight on c dominates; a float64 or int64 sum would overflow here


def test_fedavg_integer_rule_ties_go_to_even_and_small_sums_stay_exact() -> None:
    # (1·y_a + 1·y_b) / 2 with y_a + y_b odd: ties. 0.5 -> 0, 1.5 -> 2, 2.5 -> 2, -0.5 -> 0, -1.5 -> -2
    ya = np.array([0, 1, 2, -1, -2, 0], np.int32)
    yb = np.array([1, 2, 3, 0, -1, 0], np.int32)
    x = {"w": np.zeros(1), "t": np.zeros(6, np.int32)}
    got = fedavg(FedAverage(), {"a": ({"w": np.zeros(1), "t": ya}, 1), "b": ({"w": np.zeros(1), "t": yb}, 1)}, x)
    np.testing.assert_array_equal(got["t"], [0, 2, 2, 0, -2, 0])
    assert got["t"].dtype == np.int32
    np.testing.assert_array_equal(got["t"], exact_weighted_mean([ya, yb], [1, 1], np.dtype(np.int32)))


def test_fedavg_uint64_and_0d_integer_buffers() -> None:
    big = np.iinfo(np.uint64).max
    ys = [np.array([big, 3], np.uint64), np.array([big - 1, 4], np.uint64)]
    x = {"w": np.zeros(1), "u": np.zeros(2, np.uint64), "n": np.array(0, np.int64)}
    replies = {"a": ({"w": np.zeros(1), "u": ys[0], "n": np.array(40, np.int64)}, 1),
               "b": ({"w": np.zeros(1), "u": ys[1], "n": np.array(45, np.int64)}, 2)}
    got = fedavg(FedAverage(), replies, x)
    np.testing.assert_array_equal(got["u"], exact_weighted_mean(ys, [1, 2], np.dtype(np.uint64)))
    assert got["n"].shape == () and got["n"].dtype == np.int64 and int(got["n"]) == 43  # 130/3 = 43.33


def test_fedavg_float_buffers_are_weighted_like_parameters() -> None:
    rng = np.random.default_rng(0)
    ys = [rng.normal(50, 2, size=3).astype(np.float32) for _ in range(3)]
    ns = [10, 30, 7]
    x = {"w": np.zeros(1, np.float32), "bn.running_mean": np.zeros(3, np.float32)}
    replies = {f"n{i}": ({"w": np.zeros(1, np.float32), "bn.running_mean": y}, n)
               for i, (y, n) in enumerate(zip(ys, ns, strict=True))}
    got = fedavg(FedAverage(), replies, x)["bn.running_mean"]
    expected = sum(n * y.astype(np.float64) for n, y in zip(ns, ys, strict=True)) / sum(ns)
    np.testing.assert_array_equal(got, expected.astype(np.float32))


def test_buffers_must_name_global_params_and_be_numeric() -> None:
    x = {"w": np.zeros(2), "flag": np.zeros(2, bool)}
    with pytest.raises(AggregationError, match=r"buffers \['nope'\] are not among the global params"):
        FedAverage().begin_round(0, {"w": np.zeros(2)}, ["a"], ["a"], buffers=["nope"])
    with pytest.raises(AggregationError, match=r"'flag' of dtype bool"):
        FedAverage().begin_round(0, x, ["a"], ["a"], buffers=["flag"])
    with pytest.raises(AggregationError, match=r"buffers must be a collection of names"):
        FedAverage().begin_round(0, {"w": np.zeros(2)}, ["a"], ["a"], buffers="w")


# -- Scaffold ---------------------------------------------------------------------------------------------
X0 = {"w": np.array([1.0, -2.0]), "bn.running_mean": np.array([0.0, 0.0]), "bn.num_batches_tracked": np.array(0)}
BUFFERS = ["bn.running_mean", "bn.num_batches_tracked"]


def test_scaffold_controls_and_corrections_cover_parameters_only_and_buffers_get_the_weighted_mean() -> None:
    eta_g = 0.5
    agg = Scaffold(server_lr=eta_g)
    known = ["a", "b", "c"]
    agg.begin_round(1, X0, ["a", "b"], known, buffers=BUFFERS)
    for node in ("a", "b"):
        assert sorted(agg.node_task_state(node)["correction"]) == ["w"]
    y = {"a": {"w": np.array([0.6, -1.8]), "bn.running_mean": np.array([49.0, 1.0]),
               "bn.num_batches_tracked": np.array(3)},
         "b": {"w": np.array([1.2, -2.4]), "bn.running_mean": np.array([51.0, 2.0]),
               "bn.num_batches_tracked": np.array(4)}}
    n = {"a": 10, "b": 30}
    steps = {"a": (2, 0.1), "b": (4, 0.05)}
    for node in ("a", "b"):
        agg.accumulate(NodeReply(node, y[node], n[node], steps[node][0], steps[node][1]))
    x1 = agg.finalize()
    # parameters: x⁺ = x + η_g · mean(y_i − x); buffers: Σ n_i y_i / Σ n_i, whatever η_g
    np.testing.assert_allclose(x1["w"], X0["w"] + eta_g * np.mean([y[k]["w"] - X0["w"] for k in y], axis=0),
                               rtol=1e-15)
    np.testing.assert_allclose(x1["bn.running_mean"], (10 * y["a"]["bn.running_mean"] + 30 * y["b"]["bn.running_mean"])
                               / 40, rtol=1e-15)
    assert x1["bn.num_batches_tracked"].dtype == X0["bn.num_batches_tracked"].dtype
    assert int(x1["bn.num_batches_tracked"]) == 4  # (10·3 + 30·4) / 40 = 3.75
    state = agg.state()
    assert sorted(state["server_control"]) == ["w"]
    assert all(sorted(c) == ["w"] for c in state["node_controls"].values())
    # c_i⁺ = c_i − c + (x − y_i) / (K η_l) over w only
    np.testing.assert_allclose(state["node_controls"]["a"]["w"], (X0["w"] - y["a"]["w"]) / 0.2, rtol=1e-12)
    np.testing.assert_allclose(state["server_control"]["w"],
                               (2 / 3) * np.mean([(X0["w"] - y[k]["w"]) / 0.2 for k in y], axis=0), rtol=1e-12)


def _round(agg: Scaffold, x: dict, index: int, nodes: list[str]) -> dict:
    agg.begin_round(index, x, nodes, ["a", "b", "c"], buffers=BUFFERS)
    for k, node in enumerate(nodes):
        y = {key: (v - 0.01 * (k + 1 + index)).astype(v.dtype) if v.dtype.kind == "f" else v + k + 1
             for key, v in x.items()}
        agg.accumulate(NodeReply(node, y, num_samples=10 + k, num_steps=5, lr=0.1))
    return agg.finalize()


def test_scaffold_with_buffers_resumes_bit_for_bit_through_the_serializer() -> None:
    reference = Scaffold(server_lr=0.7)
    x1 = _round(reference, X0, 1, ["a", "b"])
    resumed = build_aggregator(reference.name, reference.config())
    resumed.load_state(Serializer.loads(Serializer.dumps(reference.state())))
    expected = _round(reference, x1, 2, ["b", "c"])
    got = _round(resumed, x1, 2, ["b", "c"])
    assert expected.keys() == got.keys()
    for key in expected:
        assert expected[key].dtype == got[key].dtype and expected[key].tobytes() == got[key].tobytes(), key


def test_scaffold_state_from_before_buffers_goes_on_with_buffers_added() -> None:
    """A checkpoint written before buffers were federated holds control variates of the parameters only,
    which is what Scaffold keeps now: the same state goes on with the buffers added to x."""
    old = Scaffold()
    old.begin_round(1, {"w": X0["w"]}, ["a"], ["a"])
    old.accumulate(NodeReply("a", {"w": np.array([0.5, -1.5])}, 10, 2, 0.1))
    x1 = old.finalize()
    resumed = Scaffold()
    resumed.load_state(Serializer.loads(Serializer.dumps(old.state())))
    resumed.begin_round(2, {**x1, "bn.running_mean": np.zeros(2), "bn.num_batches_tracked": np.array(0)},
                        ["a"], ["a"], buffers=BUFFERS)
    np.testing.assert_array_equal(resumed.node_task_state("a")["correction"]["w"], np.zeros(2))
    # and a parameter set that differs from the control variates is still refused, naming the difference
    fresh = Scaffold()
    fresh.load_state(old.state())
    with pytest.raises(AggregationError, match=r"names only in control variates: \['w'\], only in global params"):
        fresh.begin_round(2, {"v": np.zeros(2), "bn.running_mean": np.zeros(2)}, ["a"], ["a"],
                          buffers=["bn.running_mean"])


def test_scaffold_still_refuses_integer_parameters_but_takes_integer_buffers() -> None:
    with pytest.raises(AggregationError, match=r"Scaffold cannot aggregate.*'steps' of dtype int64"):
        Scaffold().begin_round(0, {"w": np.zeros(2), "steps": np.zeros(2, np.int64)}, ["a"], ["a"])
    agg = Scaffold()
    agg.begin_round(0, {"w": np.zeros(2), "steps": np.zeros(2, np.int64)}, ["a"], ["a"], buffers=["steps"])
    agg.accumulate(NodeReply("a", {"w": np.ones(2), "steps": np.array([5, 6], np.int64)}, 3, 1, 0.1))
    np.testing.assert_array_equal(agg.finalize()["steps"], [5, 6])


def test_scaffold_buffers_need_samples() -> None:
    agg = Scaffold()
    agg.begin_round(0, X0, ["a"], ["a"], buffers=BUFFERS)
    agg.accumulate(NodeReply("a", X0, 0, 1, 0.1))
    with pytest.raises(AggregationError, match=r"Scaffold \(buffers.*num_samples=0"):
        agg.finalize()
