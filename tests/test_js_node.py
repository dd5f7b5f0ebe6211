"""The JavaScript node (clients/js): its own test suite, and real federations with fedserver.

The JS node runs as a separate ``node`` process built from protos/ and docs/ only. End to end: a FedAvg
Experiment with one Python fednode and one JS node on a linear least-squares model; both contribute,
the global model moves toward the pooled least-squares solution, and the JS node's arithmetic matches
a Python node's on the same data (full-batch, no shuffling: the runs are deterministic). With ``test_ratio``
and a ``seed`` both kinds of node hold out the same samples (docs/protocol.md §6, "The held-out split"):
their validation metrics and an ``Experiment.evaluate()`` are recomputed in numpy on those samples. Then TLS
and mutual TLS with certificates from ``fedserver certs``, a plan the JS node has not approved, and a
revoked token.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import subprocess
import sys
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import numpy as np
import pytest
from experiment_harness import federation, least_squares_sites
from js_node_support import JS, NODE, ROOT, need_npm_deps, needs_node
from plans_lsq import LinearPlan

from fedcore.aggregators import FedAverage, Scaffold
from fedcore.errors import RoundFailedError
from fedcore.plans.split import held_out_indices
from fedcore.tasks import PlanSource
from fedserver.auth import NodeStore
from fedserver.config import ServerConfig
from fedserver.experiment import Experiment
from fedserver.history import HistoryStore
from fedserver.server import FedServer

pytestmark = needs_node

N_PER_SITE = 80
ARGS = {"num_updates": 20, "lr": 0.01, "batch_size": N_PER_SITE, "shuffle": False}
PLAN_SHA = PlanSource.from_class(LinearPlan).sha256


def run(coro, timeout: float = 150):
    return asyncio.run(asyncio.wait_for(coro, timeout=timeout))


def write_csv(path: Path, X: np.ndarray, y: np.ndarray) -> Path:
    header = ",".join([f"x{j}" for j in range(X.shape[1])] + ["y"])
    rows = [",".join(repr(float(v)) for v in [*x, t]) for x, t in zip(X, y.ravel(), strict=True)]
    path.write_text("\n".join([header, *rows]) + "\n")
    return path


def pooled(sites) -> tuple[np.ndarray, np.ndarray]:
    X = np.concatenate([np.hstack([x, np.ones((len(x), 1))]) for x, _ in sites]).astype(np.float64)
    y = np.concatenate([t for _, t in sites]).astype(np.float64)
    return X, y


def joint_loss(params: dict[str, np.ndarray], sites) -> float:
    X, y = pooled(sites)
    w = np.concatenate([params["coef"].ravel(), params["intercept"].ravel()]).astype(np.float64)
    return float(np.mean((X @ w - y.ravel()) ** 2))


def flat(params: dict[str, np.ndarray]) -> np.ndarray:
    return np.concatenate([params["coef"].ravel(), params["intercept"].ravel()]).astype(np.float64)


@contextlib.asynccontextmanager
async def js_node(tmp: Path, server: str, data: Path, *, extra: Sequence[str] = (), token: str | None = None,
                  approve: bool = True) -> AsyncIterator[asyncio.subprocess.Process]:
    """``node clients/js/src/cli.js`` as a child process; stopped with SIGTERM at the end."""
    args = [str(JS / "src" / "cli.js"), "--server", server, "--data", str(data), "--target", "y",
            "--tags", "lsq", "--poll-wait", "1", "--name", "js-node", *extra]
    if token is not None:
        token_file = tmp / "js.token"
        token_file.write_text(token + "\n")
        args += ["--token-file", str(token_file)]
    if approve:
        args += ["--approve-plan", PLAN_SHA]
    log = (tmp / "js-node.log").open("wb")
    proc = await asyncio.create_subprocess_exec(NODE, *args, stdout=log, stderr=subprocess.STDOUT, cwd=tmp)
    try:
        yield proc
    finally:
        if proc.returncode is None:
            proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), timeout=10)
            except TimeoutError:
                proc.kill()
                await proc.wait()
        log.close()


@contextlib.asynccontextmanager
async def bare_server(tmp: Path, **config) -> AsyncIterator[FedServer]:
    """A FedServer on a free loopback port with its own node store (no Python node)."""
    config = {"tls": "insecure", **config}
    server = FedServer(ServerConfig(port=0, max_poll_wait_seconds=2.0, heartbeat_interval_seconds=1.0, **config),
                       NodeStore(tmp / "nodes.db"))
    await server.start()
    try:
        yield server
    finally:
        await server.stop(grace=1.0)


def js_log(tmp: Path) -> str:
    path = tmp / "js-node.log"
    return path.read_text(errors="replace") if path.exists() else "(no log)"


def test_js_test_suite_passes() -> None:
    """``node --test clients/js/test/``: codec, conformance vectors, framing, training maths, client.

    The files are listed explicitly: newer Node versions read ``--test`` arguments as glob patterns.
    """
    need_npm_deps()
    files = sorted(str(p.relative_to(ROOT)) for p in (JS / "test").glob("*.test.js"))
    assert len(files) >= 5, files
    proc = subprocess.run([NODE, "--test", *files], check=False, cwd=ROOT, capture_output=True, text=True,
                          timeout=240)
    assert proc.returncode == 0 and "# fail 0" in proc.stdout, _failures(proc.stdout) + proc.stderr[-3000:]


def _failures(tap: str, context: int = 40) -> str:
    """The ``not ok`` entries of a ``node --test`` TAP report with the lines after each (the YAML block with
    the error and its stack), then the summary: a failure deep in a long report is not cut off."""
    lines = tap.splitlines()
    parts = ["\n".join(lines[i:i + context]) for i, line in enumerate(lines) if line.lstrip().startswith("not ok")]
    return "\n---\n".join(parts[:10]) + "\n---\n" + "\n".join(lines[-12:]) + "\n"


async def _federated(tmp: Path, sites, rounds: int, with_js: bool, aggregator=None) -> tuple[list, dict, Experiment]:
    """One Python fednode on site 0; site 1 is a JS node (with_js) or a second Python node."""
    python_sites = [sites[0]] if with_js else sites
    async with federation(tmp, python_sites) as (server, _, _), contextlib.AsyncExitStack() as stack:
        if with_js:
            data = write_csv(tmp / "site-1.csv", *sites[1])
            token = server.node_store.enroll("js-1")
            await stack.enter_async_context(js_node(tmp, f"127.0.0.1:{server.port}", data, token=token,
                                                    extra=["--tls", "insecure"]))
        exp = Experiment(LinearPlan, ARGS, aggregator=aggregator or FedAverage(), rounds=rounds, dataset_tags=["lsq"],
                         min_nodes=2, round_timeout=30, node_wait_timeout=60, server=server, progress=False,
                         history_db=tmp / "history.db")
        initial = exp.initial_params()
        reports = await exp.run_async()
        return reports, initial, exp


def test_fedavg_with_a_python_node_and_a_javascript_node(tmp_path: Path) -> None:
    need_npm_deps()
    sites = least_squares_sites(n_sites=2, n=N_PER_SITE, seed=3)
    (tmp_path / "mixed").mkdir()
    (tmp_path / "python").mkdir()
    try:
        reports, initial, exp = run(_federated(tmp_path / "mixed", sites, rounds=5, with_js=True))
    except BaseException:
        print(js_log(tmp_path / "mixed"))
        raise

    # both contribute, every round
    assert [r.round for r in reports] == [1, 2, 3, 4, 5]
    assert all(sorted(r.succeeded) == ["js-1", "site-0"] for r in reports), [r.outcomes for r in reports]
    history = HistoryStore(tmp_path / "mixed" / "history.db")
    results = history.node_results(exp.history_id)
    history.close()
    js = [r for r in results if r.node_id == "js-1"]
    assert len(js) == 5 and all(r.outcome == "succeeded" for r in js)
    assert all(r.num_steps == 20 and r.num_samples == 20 * N_PER_SITE for r in js)
    assert all(r.bytes_in > 0 and r.bytes_out > 0 and r.training_metrics["loss"] > 0 for r in js)

    # same names, shapes and dtypes as sent; the model moves toward the pooled least-squares solution
    final = exp.params
    assert {k: (v.shape, v.dtype.str) for k, v in final.items()} == {"coef": ((3, 1), "<f4"), "intercept": ((1,), "<f4")}
    X, y = pooled(sites)
    optimum = np.linalg.lstsq(X, y, rcond=None)[0].ravel()
    distances = [np.linalg.norm(flat(p) - optimum) for p in [initial, *(r.params for r in reports)]]
    assert all(b < a for a, b in itertools.pairwise(distances)), distances
    assert distances[-1] < 0.5 * distances[0], distances
    assert joint_loss(final, sites) < 0.25 * joint_loss(initial, sites)

    # the JS node does the same maths as a Python node (float64 vs float32 arithmetic: close, not equal)
    reference, _, _ = run(_federated(tmp_path / "python", sites, rounds=5, with_js=False))
    np.testing.assert_allclose(flat(final), flat(reference[-1].params), rtol=1e-4, atol=1e-5)


def test_scaffold_with_a_javascript_node_matches_an_all_python_run(tmp_path: Path) -> None:
    """The JS node applies the Scaffold correction (aggregator_state) as a Python node does."""
    need_npm_deps()
    sites = least_squares_sites(n_sites=2, n=N_PER_SITE, seed=4)
    (tmp_path / "mixed").mkdir()
    (tmp_path / "python").mkdir()
    try:
        mixed, _, _ = run(_federated(tmp_path / "mixed", sites, rounds=4, with_js=True, aggregator=Scaffold(server_lr=1.0)))
    except BaseException:
        print(js_log(tmp_path / "mixed"))
        raise
    assert all(sorted(r.succeeded) == ["js-1", "site-0"] for r in mixed)
    reference, _, _ = run(_federated(tmp_path / "python", sites, rounds=4, with_js=False, aggregator=Scaffold(server_lr=1.0)))
    for a, b in zip(mixed, reference, strict=True):
        np.testing.assert_allclose(flat(a.params), flat(b.params), rtol=1e-4, atol=1e-5)


SPLIT_ARGS = {**ARGS, "test_ratio": 0.25, "seed": 5, "test_on_global_updates": True, "test_on_local_updates": True}


def mse(X: np.ndarray, y: np.ndarray, params: dict[str, np.ndarray]) -> float:
    """L = 1/n Σ (X W + b − y)² in float64."""
    z = X.astype(np.float64) @ params["coef"].astype(np.float64) + params["intercept"].astype(np.float64)
    return float(np.mean((z - y.astype(np.float64)) ** 2))


def gradient_descent(X: np.ndarray, y: np.ndarray, params: dict[str, np.ndarray], lr: float, steps: int) -> np.ndarray:
    """``steps`` full-batch steps W ← W − η Xᵀ G, b ← b − η Σ G, G = 2 (X W + b − y) / n, in float64: flat (W, b)."""
    X, y = X.astype(np.float64), y.astype(np.float64)
    W, b = params["coef"].astype(np.float64), params["intercept"].astype(np.float64)
    for _ in range(steps):
        G = 2 * (X @ W + b - y) / len(X)
        W, b = W - lr * X.T @ G, b - lr * G.sum(axis=0)
    return np.concatenate([W.ravel(), b.ravel()])


def test_validation_and_evaluation_on_the_same_held_out_split_as_a_python_node(tmp_path: Path) -> None:
    """test_ratio 0.25 and seed 5: each node holds out the 20 samples of smallest SplitMix64 keys, trains on the
    other 60, reports its validation before / after training on the 20, and evaluate() scores the final model on
    them, the JS node as the Python node."""
    need_npm_deps()
    sites = least_squares_sites(n_sites=2, n=N_PER_SITE, seed=8)
    train_rows, held_rows = held_out_indices(N_PER_SITE, SPLIT_ARGS["test_ratio"], SPLIT_ARGS["seed"])
    assert len(held_rows) == 20

    async def main():
        async with federation(tmp_path, [sites[0]]) as (server, _, _), contextlib.AsyncExitStack() as stack:
            data = write_csv(tmp_path / "site-1.csv", *sites[1])
            token = server.node_store.enroll("js-1")
            await stack.enter_async_context(js_node(tmp_path, f"127.0.0.1:{server.port}", data, token=token,
                                                    extra=["--tls", "insecure"]))
            exp = Experiment(LinearPlan, SPLIT_ARGS, rounds=2, dataset_tags=["lsq"], min_nodes=2, round_timeout=30,
                             node_wait_timeout=60, server=server, progress=False)
            initial = exp.initial_params()
            reports = await exp.run_async()
            return initial, reports, await exp.evaluate_async(), exp.params

    try:
        initial, reports, evaluation, final = run(main())
    except BaseException:
        print(js_log(tmp_path))
        raise

    sent = [initial, *(r.params for r in reports)]
    # rtol of a loss at given params, then of one at params recomputed here: the JS node computes in float64, the
    # Python plan (float32 model) in float32
    nodes = (("js-1", sites[1], (1e-9, 1e-6)), ("site-0", sites[0], (1e-5, 1e-4)))
    for rnd, report in enumerate(reports):
        results = {o.node_id: o.result for o in report.outcomes if o.result is not None}
        assert sorted(results) == ["js-1", "site-0"], report.outcomes
        local = {}  # each node's update, recomputed on its 60 training samples (the replies' params are released)
        for node, (X, y), rtol in nodes:
            local[node] = gradient_descent(X[train_rows], y[train_rows], sent[rnd], ARGS["lr"], ARGS["num_updates"])
            trained = {"coef": local[node][:3].reshape(3, 1).astype(np.float32), "intercept": local[node][3:].astype(np.float32)}
            result = results[node]
            assert result.num_samples == ARGS["num_updates"] * len(train_rows), node  # training samples only
            assert set(result.validation) == {"before", "after"} and set(result.validation["after"]) == {"loss"}
            np.testing.assert_allclose(result.validation["before"]["loss"], mse(X[held_rows], y[held_rows], sent[rnd]),
                                       rtol=rtol[0], err_msg=node)
            np.testing.assert_allclose(result.validation["after"]["loss"], mse(X[held_rows], y[held_rows], trained),
                                       rtol=rtol[1], err_msg=node)
        # FedAvg of two replies of 1200 samples each: the mean of the two updates on the training samples
        np.testing.assert_allclose(flat(report.params), (local["js-1"] + local["site-0"]) / 2, rtol=1e-4, atol=1e-5)
        # each val_* metric is the mean weighted by the held-out counts the nodes report (20 each: Python and JS)
        assert {node: r.validation_samples for node, r in results.items()} == {"js-1": 20, "site-0": 20}
        for when in ("before", "after"):
            by_hand = sum(r.validation_samples * r.validation[when]["loss"] for r in results.values()) / 40
            np.testing.assert_allclose(report.metrics[f"val_{when}_loss"], by_hand, rtol=1e-12)

    assert sorted(evaluation.succeeded) == ["js-1", "site-0"] and evaluation.round == 2
    outcomes = {o.node_id: o.result for o in evaluation.outcomes}
    for node, (X, y), rtol in nodes:
        result = outcomes[node]
        assert (result.num_samples, result.split, set(result.metrics)) == (20, "validation", {"loss"}), node
        np.testing.assert_allclose(result.metrics["loss"], mse(X[held_rows], y[held_rows], final), rtol=rtol[0],
                                   err_msg=node)
    assert evaluation.num_samples == 40
    np.testing.assert_allclose(evaluation.metrics["loss"],
                               (outcomes["js-1"].metrics["loss"] + outcomes["site-0"].metrics["loss"]) / 2, rtol=1e-12)


def test_evaluation_on_every_sample_without_a_held_out_split(tmp_path: Path) -> None:
    """test_ratio 0: the JS node evaluates on all its samples and says so (split "all")."""
    need_npm_deps()
    sites = least_squares_sites(n_sites=1, n=N_PER_SITE, seed=9)
    data = write_csv(tmp_path / "site.csv", *sites[0])

    async def main():
        async with bare_server(tmp_path) as server:
            token = server.node_store.enroll("js-1")
            async with js_node(tmp_path, f"127.0.0.1:{server.port}", data, token=token, extra=["--tls", "insecure"]):
                exp = Experiment(LinearPlan, ARGS, rounds=1, dataset_tags=["lsq"], min_nodes=1, round_timeout=30,
                                 node_wait_timeout=60, server=server, progress=False)
                reports = await exp.run_async()
                return reports, await exp.evaluate_async(), exp.params

    try:
        reports, evaluation, final = run(main())
    except BaseException:
        print(js_log(tmp_path))
        raise
    assert reports[0].outcomes[0].result.validation == {}
    (outcome,) = evaluation.outcomes
    assert outcome.outcome == "succeeded", outcome.error
    assert (outcome.result.num_samples, outcome.result.split) == (N_PER_SITE, "all")
    np.testing.assert_allclose(outcome.result.metrics["loss"], mse(*sites[0], final), rtol=1e-9)


def make_certs(tmp: Path) -> Path:
    certs = tmp / "certs"
    for action in (["init"], ["server"], ["node", "js-1"]):
        subprocess.run([sys.executable, "-m", "fedserver", "certs", *action, "--dir", str(certs)], cwd=ROOT,
                       check=True, capture_output=True, timeout=60)
    return certs


@pytest.mark.parametrize("mode", ["tls", "mtls"])
def test_javascript_node_over_tls_and_mutual_tls(tmp_path: Path, mode: str) -> None:
    """The JS node alone trains one round over TLS (token identity) or mutual TLS (certificate CN)."""
    need_npm_deps()
    certs = make_certs(tmp_path)
    sites = least_squares_sites(n_sites=1, n=N_PER_SITE, seed=5)
    data = write_csv(tmp_path / "site.csv", *sites[0])

    async def main():
        async with bare_server(tmp_path, tls=mode, cert_file=certs / "server.crt", key_file=certs / "server.key",
                               ca_file=certs / "ca.crt" if mode == "mtls" else None) as server:
            extra = ["--tls", mode, "--ca-cert", str(certs / "ca.crt")]
            token = None
            if mode == "mtls":
                extra += ["--client-cert", str(certs / "nodes" / "js-1.crt"),
                          "--client-key", str(certs / "nodes" / "js-1.key")]
            else:
                token = server.node_store.enroll("js-1")
            async with js_node(tmp_path, f"localhost:{server.port}", data, token=token, extra=extra):
                exp = Experiment(LinearPlan, ARGS, rounds=2, dataset_tags=["lsq"], min_nodes=1, round_timeout=30,
                                 node_wait_timeout=60, server=server, progress=False)
                initial = exp.initial_params()
                reports = await exp.run_async()
        return reports, initial

    try:
        reports, initial = run(main())
    except BaseException:
        print(js_log(tmp_path))
        raise
    assert all(r.succeeded == ["js-1"] for r in reports)
    assert joint_loss(reports[-1].params, sites) < joint_loss(initial, sites)


def test_unapproved_plan_is_refused_by_the_javascript_node(tmp_path: Path) -> None:
    need_npm_deps()
    sites = least_squares_sites(n_sites=1, n=N_PER_SITE, seed=6)
    data = write_csv(tmp_path / "site.csv", *sites[0])

    async def main():
        async with bare_server(tmp_path) as server:
            token = server.node_store.enroll("js-1")
            async with js_node(tmp_path, f"127.0.0.1:{server.port}", data, token=token, approve=False,
                               extra=["--tls", "insecure"]):
                exp = Experiment(LinearPlan, ARGS, rounds=1, dataset_tags=["lsq"], min_nodes=1, round_timeout=30,
                                 node_wait_timeout=60, server=server, progress=False)
                with pytest.raises(RoundFailedError) as info:
                    await exp.run_async()
                return str(info.value)

    message = run(main())
    assert "refused" in message and "not approved" in message and PLAN_SHA in message, message


def test_revoked_token_stops_the_javascript_node(tmp_path: Path) -> None:
    """UNAUTHENTICATED is not retried: the node exits with status 3 and says why."""
    need_npm_deps()
    sites = least_squares_sites(n_sites=1, n=10, seed=7)
    data = write_csv(tmp_path / "site.csv", *sites[0])

    async def main():
        async with bare_server(tmp_path) as server:
            token = server.node_store.enroll("js-1")
            server.node_store.revoke("js-1")
            async with js_node(tmp_path, f"127.0.0.1:{server.port}", data, token=token,
                               extra=["--tls", "insecure"]) as proc:
                return await asyncio.wait_for(proc.wait(), timeout=30)

    assert run(main()) == 3
    assert "UNAUTHENTICATED" in js_log(tmp_path) or "revoked" in js_log(tmp_path).lower(), js_log(tmp_path)
