"""What keeps a round's server memory O(model): block-wise aggregation maths, and no reply kept after use."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest
from experiment_harness import federation, least_squares_sites
from plans_lsq import LinearPlan

from fedcore.aggregators import FedAverage
from fedcore.aggregators._api import BLOCK, add_scaled, all_finite
from fedserver.experiment import Experiment

ARGS = {"num_updates": 5, "lr": 0.02, "batch_size": 16, "seed": 7, "shuffle": True}


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.int32])
def test_add_scaled_equals_the_widened_formula_bit_for_bit(dtype) -> None:
    rng = np.random.default_rng(0)
    shape = (3, BLOCK // 2 + 7)  # three blocks and a ragged tail
    value = (rng.standard_normal(shape) * 1000).astype(dtype)
    total = rng.standard_normal(shape)
    expected = total + np.float64(37) * value.astype(np.float64)
    add_scaled(total, value, np.float64(37))
    assert total.dtype == np.float64
    np.testing.assert_array_equal(total, expected)


def test_add_scaled_reads_non_contiguous_values() -> None:
    value = np.arange(2 * BLOCK + 10, dtype=np.float32)[::2]
    total = np.zeros(value.shape)
    add_scaled(total, value, np.float64(2))
    np.testing.assert_array_equal(total, 2.0 * value.astype(np.float64))


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_all_finite_finds_a_bad_value_in_any_block(bad) -> None:
    value = np.ones(2 * BLOCK + 3, dtype=np.float32)
    assert all_finite(value)
    for where in (0, BLOCK, value.size - 1):
        probe = value.copy()
        probe[where] = bad
        assert not all_finite(probe)
        assert not all_finite(probe.reshape(1, -1))


def test_reports_keep_counts_not_reply_params_and_drop_old_global_params(tmp_path: Path) -> None:
    sites = least_squares_sites()

    async def main():
        async with federation(tmp_path, sites) as (server, _, _):
            exp = Experiment(LinearPlan, ARGS, aggregator=FedAverage(), rounds=3, dataset_tags=["lsq"],
                             min_nodes=3, round_timeout=30, server=server, progress=False,
                             keep_round_params=False)
            return await exp.run_async(), exp

    reports, exp = asyncio.run(asyncio.wait_for(main(), timeout=120))
    assert [r.params for r in reports[:-1]] == [{}, {}]
    assert reports[-1].params is exp.params and set(exp.params) == {"coef", "intercept"}
    for report in reports:
        assert sorted(report.succeeded) == ["site-0", "site-1", "site-2"]
        for outcome in report.outcomes:
            assert outcome.result is not None and outcome.result.params == {}
            assert outcome.result.num_samples > 0 and outcome.result.num_steps == 5
    assert reports[-1].metrics["train_loss"] > 0


def test_receive_window_is_a_fixed_grpc_window_and_is_validated() -> None:
    from fedcore.errors import ServerConfigError
    from fedserver.config import ServerConfig

    probing = ServerConfig(tls="insecure", receive_window_bytes=None).grpc_options()
    assert not any(name == "grpc.http2.bdp_probe" for name, _ in probing)
    options = dict(ServerConfig(tls="insecure", receive_window_bytes=256 << 10).grpc_options())
    assert options["grpc.http2.bdp_probe"] == 0 and options["grpc.http2.lookahead_bytes"] == 256 << 10
    for bad in (0, 1000, True, 1.5e6, "bdp"):
        with pytest.raises(ServerConfigError, match="receive_window_bytes must be 'auto', None .BDP probing. or an "
                                                    "int >= 65535, got"):
            ServerConfig(tls="insecure", receive_window_bytes=bad)


@pytest.mark.parametrize("address, window", [
    ("127.0.0.1", (1 << 20) + (64 << 10)), ("127.1.2.3", (1 << 20) + (64 << 10)), ("localhost", (1 << 20) + (64 << 10)),
    ("LocalHost", (1 << 20) + (64 << 10)), ("::1", (1 << 20) + (64 << 10)), ("[::1]", (1 << 20) + (64 << 10)),
    ("0.0.0.0", None), ("[::]", None), ("10.0.0.5", None), ("fed.example.org", None),
])
def test_auto_receive_window_is_one_chunk_message_on_loopback_and_probing_on_a_network(address, window) -> None:
    from fedserver.config import ServerConfig

    config = ServerConfig(tls="insecure", address=address)
    assert config.receive_window_bytes == "auto" and config.receive_window() == window
    options = dict(config.grpc_options())
    assert options.get("grpc.http2.lookahead_bytes") == window and ("grpc.http2.bdp_probe" in options) == bool(window)
    bigger = ServerConfig(tls="insecure", address=address, chunk_size=4 << 20)  # the window follows chunk_size
    assert bigger.receive_window() == (None if window is None else (4 << 20) + (64 << 10))


def test_rounds_run_with_a_small_receive_window_and_one_upload_at_a_time(tmp_path: Path) -> None:
    sites = least_squares_sites()

    async def main():
        kwargs = {"receive_window_bytes": 65535, "max_upload_buffer_bytes": 1}
        async with federation(tmp_path, sites, server_kwargs=kwargs) as (server, _, _):
            exp = Experiment(LinearPlan, ARGS, aggregator=FedAverage(), rounds=2, dataset_tags=["lsq"],
                             min_nodes=3, round_timeout=30, server=server, progress=False)
            return await exp.run_async()

    reports = asyncio.run(asyncio.wait_for(main(), timeout=120))
    assert [sorted(r.succeeded) for r in reports] == [["site-0", "site-1", "site-2"]] * 2
