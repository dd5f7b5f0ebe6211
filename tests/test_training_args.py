"""TrainingArgs: defaults, mapping behaviour, validation, precedence warnings, serialization."""

from __future__ import annotations

import json
import math
import warnings

import msgpack
import numpy as np
import pytest

from fedcore.errors import TrainingArgsError, TrainingArgsWarning
from fedcore.training_args import TrainingArgs

DEFAULTS = {
    "epochs": None,
    "num_updates": None,
    "batch_maxnum": None,
    "batch_size": 32,
    "lr": 0.01,
    "momentum": 0.0,
    "weight_decay": 0.0,
    "fedprox_mu": 0.0,
    "log_interval": 10,
    "dry_run": False,
    "seed": None,
    "shuffle": True,
    "test_ratio": 0.0,
    "test_on_global_updates": False,
    "test_on_local_updates": False,
}


def test_defaults_hold_every_key():
    args = TrainingArgs()
    assert dict(args) == DEFAULTS
    assert args.to_dict() == DEFAULTS
    assert TrainingArgs.valid_keys() == tuple(sorted(DEFAULTS))


def test_mapping_and_keywords_build_the_same_args():
    a = TrainingArgs({"num_updates": 10, "lr": 0.1})
    b = TrainingArgs(num_updates=10, lr=0.1)
    c = TrainingArgs({"num_updates": 10}, lr=0.1)
    assert a == b == c
    assert a["num_updates"] == 10 and a["lr"] == 0.1 and a["epochs"] is None


def test_key_given_twice_is_an_error():
    with pytest.raises(TrainingArgsError, match="'lr' given both"):
        TrainingArgs({"lr": 0.1}, lr=0.2)


def test_mapping_protocol():
    args = TrainingArgs(batch_size=8)
    assert args.get("batch_size") == 8
    assert args.get("nope", "fallback") == "fallback"
    assert "lr" in args and "nope" not in args
    assert len(args) == len(DEFAULTS)
    assert list(args) == list(DEFAULTS)  # stable, documented order
    with pytest.raises(KeyError, match="valid keys: batch_maxnum, batch_size"):
        args["nope"]


def test_read_only():
    args = TrainingArgs()
    with pytest.raises(TypeError):
        args["lr"] = 1.0  # type: ignore[index]
    with pytest.raises(AttributeError):
        args.lr = 1.0  # type: ignore[attr-defined]
    d = args.to_dict()
    d["lr"] = 5.0
    assert args["lr"] == 0.01  # to_dict returns a copy


def test_equality():
    assert TrainingArgs(lr=0.1) == TrainingArgs(lr=0.1)
    assert TrainingArgs(lr=0.1) != TrainingArgs(lr=0.2)
    assert TrainingArgs(lr=0.1) == {**DEFAULTS, "lr": 0.1}
    assert TrainingArgs(lr=0.1) != {"lr": 0.1}  # a partial dict is not all the arguments


def test_unknown_key_lists_valid_keys_sorted():
    with pytest.raises(TrainingArgsError) as info:
        TrainingArgs(epoch=3, zzz=1)
    message = str(info.value)
    assert "'epoch'" in message and "'zzz'" in message
    assert "valid keys: " + ", ".join(sorted(DEFAULTS)) in message


def test_non_str_key_is_an_error():
    with pytest.raises(TrainingArgsError, match="names must be str, got 3"):
        TrainingArgs({3: 1})


def test_not_a_mapping_is_an_error():
    with pytest.raises(TrainingArgsError, match="must be a mapping.*got list"):
        TrainingArgs([("lr", 0.1)])  # type: ignore[arg-type]
    with pytest.raises(TrainingArgsError, match="must be a mapping.*got str"):
        TrainingArgs.from_dict("lr=0.1")  # type: ignore[arg-type]


INT_KEYS = ["epochs", "num_updates", "batch_maxnum", "batch_size", "log_interval", "seed"]
FLOAT_KEYS = ["lr", "momentum", "weight_decay", "fedprox_mu", "test_ratio"]
BOOL_KEYS = ["dry_run", "shuffle", "test_on_global_updates", "test_on_local_updates"]


@pytest.mark.parametrize("key", INT_KEYS + FLOAT_KEYS)
def test_bool_is_not_a_number(key):
    with pytest.raises(TrainingArgsError, match=f"'{key}' expects .*not bool"):
        TrainingArgs({key: True})


@pytest.mark.parametrize("key", INT_KEYS)
@pytest.mark.parametrize("value", [1.0, "1", [1]])
def test_int_keys_reject_other_types(key, value):
    with pytest.raises(TrainingArgsError, match=f"'{key}' expects int, got {type(value).__name__}"):
        TrainingArgs({key: value})


@pytest.mark.parametrize("key", FLOAT_KEYS)
def test_float_keys_reject_strings(key):
    with pytest.raises(TrainingArgsError, match=f"'{key}' expects float.*got str"):
        TrainingArgs({key: "0.5"})


@pytest.mark.parametrize("key", BOOL_KEYS)
@pytest.mark.parametrize("value", [1, 0, "yes", None])
def test_bool_keys_accept_only_bool(key, value):
    with pytest.raises(TrainingArgsError, match=f"'{key}'"):
        TrainingArgs({key: value})


@pytest.mark.parametrize("key", ["batch_size", "lr", "momentum", "log_interval", "test_ratio"])
def test_none_only_where_optional(key):
    with pytest.raises(TrainingArgsError, match=f"'{key}' must not be None"):
        TrainingArgs({key: None})


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("epochs", 0, ">= 1"),
        ("num_updates", 0, ">= 1"),
        ("num_updates", -5, ">= 1"),
        ("batch_maxnum", 0, ">= 1"),
        ("batch_size", 0, ">= 1"),
        ("log_interval", 0, ">= 1"),
        ("seed", -1, r"in \[0, 4294967296\)"),
        ("seed", 2**32, r"in \[0, 4294967296\)"),
        ("lr", 0, "> 0"),
        ("lr", -0.1, "> 0"),
        ("momentum", 1, r"in \[0, 1\)"),
        ("momentum", -0.1, r"in \[0, 1\)"),
        ("weight_decay", -1e-9, ">= 0"),
        ("fedprox_mu", -1, ">= 0"),
        ("test_ratio", 1.0, r"in \[0, 1\)"),
        ("test_ratio", -0.1, r"in \[0, 1\)"),
    ],
)
def test_out_of_range(key, value, expected):
    with pytest.raises(TrainingArgsError, match=f"'{key}' must be {expected}, got"):
        TrainingArgs({key: value})


@pytest.mark.parametrize("key", FLOAT_KEYS)
@pytest.mark.parametrize("value", [math.inf, -math.inf, math.nan])
def test_floats_must_be_finite(key, value):
    with pytest.raises(TrainingArgsError, match=f"'{key}' must be finite"):
        TrainingArgs({key: value})


def test_boundaries_accepted():
    args = TrainingArgs(momentum=0.0, test_ratio=0.0, seed=0, weight_decay=0, fedprox_mu=0)
    assert args["seed"] == 0
    args = TrainingArgs(momentum=0.999, test_ratio=0.999, seed=2**32 - 1, lr=1e-12, epochs=1)
    assert args["seed"] == 2**32 - 1 and args["momentum"] == 0.999


def test_ints_accepted_for_floats_and_normalised():
    args = TrainingArgs(lr=1, weight_decay=0)
    assert args["lr"] == 1.0 and type(args["lr"]) is float
    assert type(args["weight_decay"]) is float


def test_numpy_scalars_normalised_to_plain_types():
    args = TrainingArgs(num_updates=np.int64(7), lr=np.float32(0.5), seed=np.uint32(3))
    assert type(args["num_updates"]) is int and args["num_updates"] == 7
    assert type(args["lr"]) is float and args["lr"] == 0.5
    assert type(args["seed"]) is int
    assert all(type(v) in (int, float, bool, type(None)) for v in args.to_dict().values())


def test_serializes_through_json_and_msgpack():
    args = TrainingArgs(num_updates=5, lr=0.25, seed=42, dry_run=True, test_ratio=0.2,
                        test_on_local_updates=True)
    assert TrainingArgs.from_dict(json.loads(json.dumps(args.to_dict()))) == args
    assert TrainingArgs.from_dict(msgpack.unpackb(msgpack.packb(args.to_dict()))) == args


def test_from_dict_validates():
    with pytest.raises(TrainingArgsError, match="'lr' must be > 0"):
        TrainingArgs.from_dict({"lr": -1.0})


def test_replace_returns_validated_copy():
    args = TrainingArgs(epochs=2)
    changed = args.replace(lr=0.5, batch_size=4)
    assert changed["lr"] == 0.5 and changed["batch_size"] == 4 and changed["epochs"] == 2
    assert args["lr"] == 0.01
    with pytest.raises(TrainingArgsError, match="'lr' must be > 0"):
        args.replace(lr=0)
    with pytest.raises(TrainingArgsError, match="unknown training argument"):
        args.replace(learning_rate=0.1)


# -- precedence warnings ---------------------------------------------------------------------


def test_num_updates_with_epochs_warns_and_keeps_values():
    with pytest.warns(TrainingArgsWarning, match="'epochs'=2 is ignored: 'num_updates' takes precedence"):
        args = TrainingArgs(num_updates=17, epochs=2)
    assert args["epochs"] == 2 and args["num_updates"] == 17  # kept as given; the accountant applies rules


def test_num_updates_with_batch_maxnum_warns():
    with pytest.warns(TrainingArgsWarning, match="'batch_maxnum'=3 is ignored"):
        TrainingArgs(num_updates=17, batch_maxnum=3)


def test_all_three_warn_twice():
    with pytest.warns(TrainingArgsWarning) as record:
        TrainingArgs(epochs=2, batch_maxnum=3, num_updates=17)
    messages = sorted(str(w.message) for w in record)
    assert len(messages) == 2
    assert messages[0].startswith("'batch_maxnum'=3") and messages[1].startswith("'epochs'=2")


def test_from_dict_warns_too():
    with pytest.warns(TrainingArgsWarning, match="'epochs'"):
        TrainingArgs.from_dict({"epochs": 1, "num_updates": 1})


@pytest.mark.parametrize("key", ["test_on_global_updates", "test_on_local_updates"])
def test_testing_without_test_data_warns(key):
    with pytest.warns(TrainingArgsWarning, match=f"'{key}'=True is ignored: 'test_ratio' is 0"):
        TrainingArgs({key: True})


def test_consistent_args_do_not_warn():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        TrainingArgs(epochs=2, batch_maxnum=3)
        TrainingArgs(num_updates=5)
        TrainingArgs()
        TrainingArgs(test_ratio=0.1, test_on_global_updates=True, test_on_local_updates=True)


def test_warning_and_error_classes():
    assert issubclass(TrainingArgsWarning, UserWarning)
    assert issubclass(TrainingArgsError, ValueError)


def test_describe_and_repr():
    assert TrainingArgs.describe("momentum").startswith("momentum: float = 0.0, in [0, 1)")
    assert TrainingArgs.describe("epochs").startswith("epochs: int | None = None, >= 1")
    with pytest.raises(TrainingArgsError, match="unknown training argument 'lrate'"):
        TrainingArgs.describe("lrate")
    assert repr(TrainingArgs(num_updates=3)) == "TrainingArgs({'num_updates': 3})"
