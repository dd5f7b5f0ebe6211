"""Scaffold removes client drift: on heterogeneous least squares it reaches the pooled optimum, FedAvg does not.

Four nodes hold different data: X_i = μ_i + Z A_i (different means and covariances) and
y_i = X_i w_i* + b_i* + noise with different (w_i*, b_i*). Node i's loss is
f_i(w, b) = ||X_i w + b − y_i||² / (2 n_i) with the same n_i everywhere, so (1/N) Σ f_i — what Scaffold's
unweighted means minimise — and Σ n_i f_i — what FedAvg's sample weights minimise — share the minimiser,
the least-squares solution on the pooled data. Each node runs K = 30 full-batch gradient steps per round;
under Scaffold a step is y ← y − η_l (∇f_i(y) − δ_i) with δ_i the correction the aggregator sends.
"""

from __future__ import annotations

import numpy as np
import pytest

from fedcore.aggregators import Aggregator, FedAverage, NodeReply, Scaffold
from fedcore.strategies import NodeInfo, RandomFraction

NUM_NODES, NUM_SAMPLES, DIM, LOCAL_STEPS = 4, 60, 4, 30


def make_nodes(seed: int = 0) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    data = {}
    for i in range(NUM_NODES):
        mixing = rng.normal(size=(DIM, DIM)) * rng.uniform(0.3, 1.5)
        mean = rng.normal(scale=0.7, size=DIM)
        features = mean + rng.normal(size=(NUM_SAMPLES, DIM)) @ mixing
        w_star, b_star = rng.normal(scale=2.0, size=DIM), rng.normal()
        targets = features @ w_star + b_star + 0.1 * rng.normal(size=NUM_SAMPLES)
        data[f"node{i}"] = (features, targets)
    return data


DATA = make_nodes()
POOLED_X = np.vstack([x for x, _ in DATA.values()])
POOLED_Y = np.concatenate([y for _, y in DATA.values()])
OPTIMUM = np.linalg.lstsq(np.c_[POOLED_X, np.ones(len(POOLED_Y))], POOLED_Y, rcond=None)[0]
# Largest smoothness constant among the node losses; η_l = 0.1 / L keeps each local run stable.
SMOOTHNESS = max(
    np.linalg.eigvalsh(np.c_[x, np.ones(len(y))].T @ np.c_[x, np.ones(len(y))] / len(y)).max()
    for x, y in DATA.values()
)
LOCAL_LR = 0.1 / SMOOTHNESS


def gradient(features, targets, p):
    residual = features @ p["w"] + p["b"] - targets
    return {"w": features.T @ residual / len(targets), "b": np.asarray(residual.mean())}


def local_training(node: str, x: dict, task_state: dict) -> NodeReply:
    correction = task_state.get("correction", {"w": 0.0, "b": 0.0})
    p = {key: value.copy() for key, value in x.items()}
    for _ in range(LOCAL_STEPS):
        g = gradient(*DATA[node], p)
        p = {key: np.asarray(p[key] - LOCAL_LR * (g[key] - correction[key])) for key in p}
    return NodeReply(node, p, NUM_SAMPLES, LOCAL_STEPS, LOCAL_LR)


def relative_errors(agg: Aggregator, rounds: int, fraction: float = 1.0) -> list[float]:
    nodes = sorted(DATA)
    selector = RandomFraction(fraction, seed=3)
    x = {"w": np.zeros(DIM), "b": np.asarray(0.0)}
    errors = []
    for r in range(rounds):
        chosen = selector.select([NodeInfo(node) for node in nodes], r)
        agg.begin_round(r, x, chosen, nodes)
        for node in chosen:
            agg.accumulate(local_training(node, x, agg.node_task_state(node)))
        x = agg.finalize()
        estimate = np.r_[x["w"], x["b"]]
        errors.append(float(np.linalg.norm(estimate - OPTIMUM) / np.linalg.norm(OPTIMUM)))
    return errors


def test_problem_is_heterogeneous():
    # every node's own optimum is far from the pooled one, otherwise there would be no drift to remove
    for x, y in DATA.values():
        local = np.linalg.lstsq(np.c_[x, np.ones(len(y))], y, rcond=None)[0]
        assert np.linalg.norm(local - OPTIMUM) > 0.3 * np.linalg.norm(OPTIMUM)


def test_scaffold_reaches_the_optimum_while_fedavg_drifts():
    scaffold = relative_errors(Scaffold(), rounds=120)
    fedavg = relative_errors(FedAverage(), rounds=120)
    assert scaffold[-1] < 1e-6, scaffold[-1]
    assert fedavg[-1] > 0.05, fedavg[-1]
    # FedAvg is not merely slow: it has settled on a wrong fixed point.
    assert abs(fedavg[-1] - fedavg[59]) < 1e-3 * fedavg[-1]


@pytest.mark.parametrize("server_lr", [1.0, 0.5])
def test_scaffold_converges_with_partial_participation(server_lr):
    errors = relative_errors(Scaffold(server_lr=server_lr), rounds=200, fraction=0.5)
    assert errors[-1] < 1e-6, errors[-1]
