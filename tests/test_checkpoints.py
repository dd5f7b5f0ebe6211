"""CheckpointStore: bit-exact round trips, verified loads, crash safety and pruning, on real files."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from fedcore.aggregators import NodeReply, Scaffold, build_aggregator
from fedcore.serialization import Serializer
from fedserver.checkpoints import FORMAT_VERSION, Checkpoint, CheckpointError, CheckpointStore

ROOT = Path(__file__).resolve().parents[1]


def sample_params(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "w": rng.standard_normal((3, 4)).astype(np.float32),
        "b": rng.standard_normal(4),
        "half": rng.standard_normal(5).astype(np.float16),
        "big_endian": rng.standard_normal(3).astype(">f4"),
        "counts": rng.integers(-5, 5, size=(2, 2), dtype=np.int64),
        "mask": np.array([True, False, True]),
        "scalar": np.array(3.5, dtype=np.float32),
        "fortran": np.asfortranarray(rng.standard_normal((2, 3))),
        "empty": np.zeros((0, 3), dtype=np.float32),
    }


def save_round(store: CheckpointStore, round: int, **overrides) -> Path:
    kwargs = {
        "params": sample_params(round),
        "aggregator_name": "fedavg",
        "aggregator_config": {},
        "aggregator_state": {"aggregator": "fedavg", "version": 1},
        "experiment_state": {"round": round, "config": {"rounds": 10, "lr": 0.1}},
    }
    kwargs.update(overrides)
    return store.save(round, **kwargs)


def assert_same_arrays(got: dict, expected: dict) -> None:
    assert list(got) == list(expected)
    for key, value in expected.items():
        assert isinstance(got[key], np.ndarray), key
        assert got[key].dtype == value.dtype, key
        assert got[key].shape == value.shape, key
        assert got[key].tobytes() == value.tobytes(), key


def flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


# -- round trips -------------------------------------------------------------------------------------


def test_round_trip_is_bit_identical_and_layout_is_documented(tmp_path):
    store = CheckpointStore(tmp_path / "ckpt")
    params = sample_params(7)
    folder = save_round(store, 7, params=params)

    assert folder == tmp_path / "ckpt" / "round-0007"
    assert sorted(p.name for p in folder.iterdir()) == [
        "aggregator.msgpack",
        "experiment.json",
        "manifest.json",
        "params.msgpack",
    ]
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["format_version"] == FORMAT_VERSION and manifest["round"] == 7
    for name, entry in manifest["files"].items():
        data = (folder / name).read_bytes()
        assert entry == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    assert json.loads((tmp_path / "ckpt" / "latest.json").read_text()) == {
        "format_version": FORMAT_VERSION,
        "round": 7,
        "folder": "round-0007",
    }

    loaded = store.load_latest()
    assert isinstance(loaded, Checkpoint)
    assert loaded.round == 7 and loaded.folder == folder
    assert_same_arrays(loaded.params, params)
    assert loaded.aggregator_name == "fedavg"
    assert loaded.experiment_state == {"round": 7, "config": {"rounds": 10, "lr": 0.1}}
    assert_same_arrays(store.load(7).params, params)
    # The params file is a plain Serializer document.
    assert_same_arrays(Serializer.load(folder / "params.msgpack"), params)


def test_scaffold_like_state_with_nested_dicts_of_arrays_round_trips(tmp_path):
    rng = np.random.default_rng(1)
    state = {
        "aggregator": "scaffold",
        "version": 1,
        "server_control": {"w": rng.standard_normal((2, 3)).astype(np.float32)},
        "node_controls": {
            f"node-{i}": {"w": rng.standard_normal((2, 3)).astype(np.float32), "b": rng.standard_normal(3)}
            for i in range(3)
        },
        "known_nodes": ["node-0", "node-1", "node-2"],
        "counts": {1: 4, 2: 5},  # int keys survive: aggregator state goes through the Serializer
    }
    store = CheckpointStore(tmp_path)
    store.save(2, sample_params(), "scaffold", {"server_lr": 0.5}, state, {"round": 2})

    loaded = store.load_latest()
    assert loaded.aggregator_name == "scaffold" and loaded.aggregator_config == {"server_lr": 0.5}
    got = loaded.aggregator_state
    assert got["known_nodes"] == state["known_nodes"] and got["counts"] == {1: 4, 2: 5}
    assert_same_arrays(got["server_control"], state["server_control"])
    for node_id, controls in state["node_controls"].items():
        assert_same_arrays(got["node_controls"][node_id], controls)


def _scaffold_round(agg: Scaffold, x: dict[str, np.ndarray], round: int, nodes: list[str]) -> dict:
    agg.begin_round(round, x, nodes, ["a", "b", "c"])
    for k, node_id in enumerate(nodes):
        y = {key: (v - 0.01 * (k + 1 + round)).astype(v.dtype) for key, v in x.items()}
        agg.accumulate(NodeReply(node_id, y, num_samples=10 + k, num_steps=5, lr=0.1))
    return agg.finalize()


def test_resumed_scaffold_matches_an_uninterrupted_run_bit_for_bit(tmp_path):
    x0 = {"w": np.linspace(-1, 1, 12, dtype=np.float32).reshape(3, 4), "b": np.zeros(4)}
    reference = Scaffold(server_lr=0.7)
    x1 = _scaffold_round(reference, x0, 0, ["a", "b"])
    CheckpointStore(tmp_path).save(
        0, x1, reference.name, reference.config(), reference.state(), {"next_round": 1}
    )

    checkpoint = CheckpointStore(tmp_path).load_latest()
    resumed = build_aggregator(checkpoint.aggregator_name, checkpoint.aggregator_config)
    resumed.load_state(checkpoint.aggregator_state)
    assert_same_arrays(checkpoint.params, x1)

    expected = _scaffold_round(reference, x1, 1, ["b", "c"])
    got = _scaffold_round(resumed, checkpoint.params, 1, ["b", "c"])
    assert_same_arrays(got, expected)


def test_experiment_state_keeps_a_numpy_rng_state_beyond_64_bits(tmp_path):
    rng = np.random.default_rng(12345)
    rng.standard_normal(10)
    store = CheckpointStore(tmp_path)
    save_round(store, 0, experiment_state={"rng": rng.bit_generator.state})
    expected = rng.standard_normal(5)

    restored = np.random.default_rng()
    restored.bit_generator.state = store.load_latest().experiment_state["rng"]
    assert restored.standard_normal(5).tobytes() == expected.tobytes()


def test_saving_a_round_again_replaces_it(tmp_path):
    store = CheckpointStore(tmp_path)
    save_round(store, 3, params={"w": np.zeros(2)})
    save_round(store, 3, params={"w": np.ones(2)})
    assert store.rounds() == [3]
    assert store.load_latest().params["w"].tolist() == [1.0, 1.0]


# -- damaged checkpoints -----------------------------------------------------------------------------


@pytest.fixture
def two_rounds(tmp_path) -> CheckpointStore:
    store = CheckpointStore(tmp_path)
    save_round(store, 1)
    save_round(store, 2)
    return store


def test_flipped_byte_in_params_is_a_digest_mismatch_naming_the_file(two_rounds):
    path = two_rounds.directory / "round-0002" / "params.msgpack"
    flip_byte(path, path.stat().st_size // 2)
    with pytest.raises(
        CheckpointError, match=r"round-0002/params\.msgpack: SHA-256 [0-9a-f]{64} does not match"
    ):
        two_rounds.load_latest()
    assert two_rounds.load(1).round == 1  # the older checkpoint is untouched


def test_truncated_file_is_reported_with_both_sizes(two_rounds):
    path = two_rounds.directory / "round-0002" / "aggregator.msgpack"
    size = path.stat().st_size
    path.write_bytes(path.read_bytes()[:-3])
    with pytest.raises(
        CheckpointError, match=rf"aggregator\.msgpack: size {size - 3} bytes, the manifest says {size}"
    ):
        two_rounds.load(2)


def test_deleted_file_is_reported_missing(two_rounds):
    (two_rounds.directory / "round-0002" / "experiment.json").unlink()
    with pytest.raises(CheckpointError, match=r"round-0002/experiment\.json: file is missing"):
        two_rounds.load(2)


def test_corrupt_msgpack_with_a_consistent_manifest_is_reported_as_corrupt(two_rounds):
    folder = two_rounds.directory / "round-0002"
    garbage = b"\xc1" * 16  # 0xc1 is never used in msgpack
    (folder / "params.msgpack").write_bytes(garbage)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["files"]["params.msgpack"] = {"size": 16, "sha256": hashlib.sha256(garbage).hexdigest()}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match=r"params\.msgpack: corrupt or truncated msgpack"):
        two_rounds.load(2)


def test_params_file_holding_something_else_is_rejected(two_rounds):
    folder = two_rounds.directory / "round-0002"
    Serializer.dump([1, 2, 3], folder / "params.msgpack")
    manifest = json.loads((folder / "manifest.json").read_text())
    data = (folder / "params.msgpack").read_bytes()
    manifest["files"]["params.msgpack"] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match=r"params\.msgpack: expected a map of str names to arrays"):
        two_rounds.load(2)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"{not json", r"manifest\.json: invalid JSON"),
        (b"\xff\xfe garbage", r"manifest\.json: invalid JSON"),
        (b"[1, 2]", r"manifest\.json: expected a JSON object, got list"),
        (
            b'{"format_version": 99, "round": 2}',
            r"manifest\.json: unknown format version 99 \(this fedserver reads 1\)",
        ),
        (b'{"format_version": 1, "round": 5}', r"manifest\.json: manifest is for round 5, expected 2"),
        (
            b'{"format_version": 1, "round": 2, "created_at": "x", "files": {}}',
            r"manifest\.json: no valid entry \(size, sha256\) for 'params\.msgpack'",
        ),
    ],
)
def test_bad_manifest_is_a_checkpoint_error_naming_it(two_rounds, content, message):
    (two_rounds.directory / "round-0002" / "manifest.json").write_bytes(content)
    with pytest.raises(CheckpointError, match=message):
        two_rounds.load(2)


def test_missing_manifest_hides_the_folder_and_load_says_so(two_rounds):
    (two_rounds.directory / "round-0002" / "manifest.json").unlink()
    assert two_rounds.rounds() == [1]
    with pytest.raises(CheckpointError, match=r"round-0002/manifest\.json: file is missing"):
        two_rounds.load(2)


def test_latest_pointing_to_a_missing_round(two_rounds):
    latest = two_rounds.directory / "latest.json"
    latest.write_text(json.dumps({"format_version": 1, "round": 9, "folder": "round-0009"}))
    with pytest.raises(
        CheckpointError, match=r"latest\.json points to round 9, but folder round-0009 is missing"
    ):
        two_rounds.load_latest()


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{", r"latest\.json: invalid JSON"),
        (
            '{"format_version": 2, "round": 1, "folder": "round-0001"}',
            r"latest\.json: unknown format version 2",
        ),
        (
            '{"format_version": 1, "round": 1, "folder": "../elsewhere"}',
            r"latest\.json: expected a round >= 0",
        ),
        ('{"format_version": 1}', r"latest\.json: expected a round >= 0 .* got round=None"),
    ],
)
def test_damaged_latest_json(two_rounds, content, message):
    (two_rounds.directory / "latest.json").write_text(content)
    with pytest.raises(CheckpointError, match=message):
        two_rounds.load_latest()


def test_empty_directory_has_no_checkpoint(tmp_path):
    store = CheckpointStore(tmp_path / "new")
    assert store.latest_round() is None and store.rounds() == []
    with pytest.raises(CheckpointError, match=r"no checkpoint in .*latest\.json is missing"):
        store.load_latest()
    with pytest.raises(
        CheckpointError, match=r"no checkpoint for round 4: folder .*round-0004 is missing \(have \[\]\)"
    ):
        store.load(4)


# -- crash safety ----------------------------------------------------------------------------------


def test_round_folder_written_but_latest_not_switched_loads_the_previous_round(two_rounds):
    latest = two_rounds.directory / "latest.json"
    before = latest.read_bytes()
    save_round(two_rounds, 3)
    latest.write_bytes(before)  # the crash came between the folder rename and the latest switch

    assert two_rounds.load_latest().round == 2
    assert two_rounds.rounds() == [1, 2, 3]  # round 3 is complete, merely not the latest


def test_half_written_temporary_folder_is_ignored_then_cleaned(two_rounds):
    partial = two_rounds.directory / ".incomplete-round-0003-abc123"
    partial.mkdir()
    (partial / "params.msgpack").write_bytes(b"\x82\xa1")  # what a crash mid-write leaves
    assert two_rounds.rounds() == [1, 2]
    assert two_rounds.load_latest().round == 2

    save_round(two_rounds, 3)
    assert not partial.exists()
    assert two_rounds.load_latest().round == 3


_WRITER = textwrap.dedent(
    """
    import sys
    import numpy as np
    from fedserver.checkpoints import CheckpointStore

    store = CheckpointStore(sys.argv[1])
    for round in range(10_000):
        params = {"w": np.full(2_000_000, round, dtype=np.float32)}
        store.save(round, params, "fedavg", {}, {"round": round}, {"round": round})
    """
)


@pytest.mark.parametrize("delay", [0.05, 0.2, 0.45])
def test_killed_writer_always_leaves_a_consistent_latest_checkpoint(tmp_path, delay):
    directory = tmp_path / "ckpt"
    writer = subprocess.Popen([sys.executable, "-c", _WRITER, str(directory)], cwd=ROOT)
    try:
        deadline = time.monotonic() + 60
        while not (directory / "latest.json").exists():
            assert writer.poll() is None, "the writer died before its first checkpoint"
            assert time.monotonic() < deadline, "no checkpoint after 60 s"
            time.sleep(0.01)
        time.sleep(delay)
    finally:
        writer.send_signal(signal.SIGKILL)
        writer.wait(timeout=30)

    checkpoint = CheckpointStore(directory).load_latest()
    w = checkpoint.params["w"]
    assert w.shape == (2_000_000,) and w.dtype == np.float32
    assert np.all(w == checkpoint.round)
    assert checkpoint.aggregator_state == {"round": checkpoint.round}
    assert checkpoint.experiment_state == {"round": checkpoint.round}


# -- pruning ---------------------------------------------------------------------------------------


def test_keep_last_prunes_older_rounds(tmp_path):
    store = CheckpointStore(tmp_path, keep_last=2)
    for round in range(5):
        save_round(store, round)
        assert store.rounds() == list(range(max(0, round - 1), round + 1))
    assert store.load_latest().round == 4


def test_pruning_never_removes_the_round_latest_points_to(tmp_path):
    store = CheckpointStore(tmp_path, keep_last=1)
    for round in range(4):
        save_round(store, round)
    assert store.rounds() == [3]
    # A run resumed from an earlier checkpoint of another store writes round 1 again: the highest
    # round (3) is kept by keep_last, and round 1 because latest names it.
    save_round(store, 1)
    assert store.rounds() == [1, 3]
    assert store.load_latest().round == 1


def test_without_keep_last_everything_is_kept(tmp_path):
    store = CheckpointStore(tmp_path)
    for round in (0, 1, 2, 10, 10_000):
        save_round(store, round)
    assert store.rounds() == [0, 1, 2, 10, 10_000]
    assert (tmp_path / "round-10000").is_dir()
    assert store.load(10).round == 10


# -- bad arguments ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"params": {"w": [1.0, 2.0]}}, "params must be a mapping of str names to numpy arrays"),
        ({"aggregator_name": ""}, "aggregator_name must be a non-empty str"),
        ({"aggregator_state": [1]}, "aggregator_state must be a mapping, got list"),
        ({"experiment_state": {"rng": object()}}, "experiment_state must be JSON-able"),
        ({"experiment_state": {"loss": float("nan")}}, "experiment_state must be JSON-able"),
        ({"aggregator_state": {"opaque": object()}}, "round 0: cannot serialize the checkpoint"),
    ],
)
def test_bad_save_arguments_raise_and_leave_nothing_behind(tmp_path, overrides, message):
    store = CheckpointStore(tmp_path)
    with pytest.raises(CheckpointError, match=message):
        save_round(store, 0, **overrides)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("round", [-1, 1.0, True, "3"])
def test_bad_round_numbers(tmp_path, round):
    with pytest.raises(CheckpointError, match="round must be an int >= 0"):
        CheckpointStore(tmp_path).save(round, sample_params(), "fedavg", {}, {}, {})


@pytest.mark.parametrize("keep_last", [0, -2, 1.5, True])
def test_bad_keep_last(tmp_path, keep_last):
    with pytest.raises(CheckpointError, match="keep_last must be an int >= 1 or None"):
        CheckpointStore(tmp_path, keep_last=keep_last)
