"""fedcore.models: NumpyModel maths and training, strict set_weights, export/reload, TorchModel, wire helper."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fedcore.errors import ModelError, WeightsMismatchError
from fedcore.models import Model, NumpyModel, weights_to_numpy

torch = pytest.importorskip("torch")
from fedcore.models import TorchModel


def _regression_data(n: int = 200, d: int = 4, k: int = 2, seed: int = 0):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, d))
    W = rng.normal(size=(d, k))
    Y = X @ W + rng.normal(size=k) + 0.1 * rng.normal(size=(n, k))
    return X, Y


def _numeric_grads(model: NumpyModel, X, y, eps: float = 1e-6) -> dict[str, np.ndarray]:
    """Central finite differences of model.loss with respect to every weight entry."""
    base = model.get_weights()
    out = {}
    for name, w in base.items():
        g = np.zeros_like(w)
        for idx in np.ndindex(w.shape):
            for sign in (+1, -1):
                shifted = {k: v.copy() for k, v in base.items()}
                shifted[name][idx] += sign * eps
                model.set_weights(shifted)
                g[idx] += sign * model.loss(X, y) / (2 * eps)
        out[name] = g
    model.set_weights(base)
    return out


# ------------------------------------------------------------------------------------------ NumpyModel
@pytest.mark.parametrize(
    ("task", "n_outputs", "labels"),
    [("linear", 1, "real1"), ("linear", 3, "real3"), ("logistic", 1, "binary"), ("logistic", 4, "multi")],
)
def test_numpy_model_grads_match_finite_differences(task, n_outputs, labels):
    rng = np.random.default_rng(1)
    X = rng.normal(size=(7, 3))
    y = {
        "real1": rng.normal(size=7),
        "real3": rng.normal(size=(7, 3)),
        "binary": rng.integers(0, 2, size=7),
        "multi": rng.integers(0, 4, size=7),
    }[labels]
    model = NumpyModel(3, n_outputs, task=task)
    model.set_weights({"coef": rng.normal(size=(3, n_outputs)), "intercept": rng.normal(size=n_outputs)})
    loss, grads = model.loss_and_grads(X, y)
    assert loss == pytest.approx(model.loss(X, y))
    numeric = _numeric_grads(model, X, y)
    for name in ("coef", "intercept"):
        np.testing.assert_allclose(grads[name], numeric[name], rtol=1e-5, atol=1e-7)


def test_numpy_model_loss_values_match_formulas():
    rng = np.random.default_rng(2)
    X = rng.normal(size=(5, 2))
    W, b = rng.normal(size=(2, 3)), rng.normal(size=3)
    model = NumpyModel(2, 3, task="logistic")
    model.set_weights({"coef": W, "intercept": b})
    y = np.array([0, 2, 1, 1, 0])
    Z = X @ W + b
    P = np.exp(Z) / np.exp(Z).sum(axis=1, keepdims=True)
    assert model.loss(X, y) == pytest.approx(-np.mean(np.log(P[np.arange(5), y])))
    np.testing.assert_allclose(model.predict_proba(X), P)

    binary = NumpyModel(2, 1, task="logistic")
    binary.set_weights({"coef": W[:, :1], "intercept": b[:1]})
    yb = np.array([1, 0, 1, 0, 0])
    p = 1 / (1 + np.exp(-Z[:, 0]))
    assert binary.loss(X, yb) == pytest.approx(-np.mean(yb * np.log(p) + (1 - yb) * np.log(1 - p)))

    linear = NumpyModel(2, 3)
    linear.set_weights({"coef": W, "intercept": b})
    Y = rng.normal(size=(5, 3))
    assert linear.loss(X, Y) == pytest.approx(np.mean((Z - Y) ** 2))


def test_numpy_linear_regression_sgd_converges_to_lstsq():
    X, Y = _regression_data()
    model = NumpyModel(4, 2)
    rng = np.random.default_rng(3)
    for _ in range(300):  # mini-batch SGD with a decaying step
        for batch in np.array_split(rng.permutation(len(X)), 10):
            _, grads = model.loss_and_grads(X[batch], Y[batch])
            model.apply_grads(grads, 0.05)
    for _ in range(2000):  # then full-batch GD to the exact minimum
        _, grads = model.loss_and_grads(X, Y)
        model.apply_grads(grads, 0.5)
    solution, *_ = np.linalg.lstsq(np.hstack([X, np.ones((len(X), 1))]), Y, rcond=None)
    weights = model.get_weights()
    np.testing.assert_allclose(weights["coef"], solution[:4], atol=1e-8)
    np.testing.assert_allclose(weights["intercept"], solution[4], atol=1e-8)
    np.testing.assert_allclose(model.predict(X), X @ solution[:4] + solution[4], atol=1e-7)


def test_numpy_logistic_regression_separates_classes():
    rng = np.random.default_rng(4)
    X = rng.normal(size=(300, 2))
    y = (X[:, 0] - 2 * X[:, 1] + 0.3 > 0).astype(np.int64)
    binary = NumpyModel(2, 1, task="logistic")
    centers = np.array([[4.0, 0.0], [-4.0, 0.0], [0.0, 4.0]])
    labels = rng.integers(0, 3, size=300)
    Xm = centers[labels] + rng.normal(size=(300, 2))
    multi = NumpyModel(2, 3, task="logistic", dtype=np.float32)
    for _ in range(500):
        binary.apply_grads(binary.loss_and_grads(X, y)[1], 1.0)
        multi.apply_grads(multi.loss_and_grads(Xm, labels)[1], 0.5)
    assert np.mean(binary.predict(X) == y) >= 0.97
    assert np.mean(multi.predict(Xm) == labels) >= 0.97
    assert multi.get_weights()["coef"].dtype == np.float32


def test_numpy_model_shapes_dtype_and_count():
    model = NumpyModel(5, 3, dtype=np.float32)
    weights = model.get_weights()
    assert {k: (v.shape, v.dtype) for k, v in weights.items()} == {
        "coef": ((5, 3), np.float32),
        "intercept": ((3,), np.float32),
    }
    assert model.num_parameters() == 18
    assert isinstance(model, Model)
    weights["coef"][:] = 7.0  # a copy: the model is unchanged
    assert not model.get_weights()["coef"].any()


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"n_features": 0}, "n_features"),
        ({"n_features": 2, "n_outputs": True}, "n_outputs"),
        ({"n_features": 2, "task": "svm"}, "'linear', 'logistic'"),
        ({"n_features": 2, "dtype": np.int32}, "int32"),
    ],
)
def test_numpy_model_rejects_bad_config(kwargs, needle):
    with pytest.raises(ModelError, match=needle):
        NumpyModel(**kwargs)


def test_numpy_model_rejects_bad_inputs():
    model = NumpyModel(3, 1, task="logistic")
    with pytest.raises(ModelError, match=r"\(n, 3\), got \(4, 2\)"):
        model.loss(np.zeros((4, 2)), np.zeros(4))
    with pytest.raises(ModelError, match=r"\{0, 1\}"):
        model.loss(np.zeros((4, 3)), np.array([0, 1, 2, 1]))
    with pytest.raises(ModelError, match=r"shape \(4,\) or \(4, 1\), got \(3,\)"):
        model.loss(np.zeros((4, 3)), np.zeros(3))
    multi = NumpyModel(3, 3, task="logistic")
    with pytest.raises(ModelError, match=r"\[0, 3\), got range \[0, 5\]"):
        multi.loss(np.zeros((2, 3)), np.array([0, 5]))
    with pytest.raises(ModelError, match="empty batch"):
        multi.loss(np.zeros((0, 3)), np.zeros(0))
    with pytest.raises(ModelError, match="predict_proba"):
        NumpyModel(3).predict_proba(np.zeros((1, 3)))


def test_numpy_set_weights_each_problem_is_named_and_nothing_is_assigned():
    model = NumpyModel(3, 2)
    model.set_weights({"coef": np.ones((3, 2)), "intercept": np.ones(2)})
    before = model.get_weights()
    good = {"coef": np.full((3, 2), 2.0), "intercept": np.full(2, 2.0)}  # would change the model
    cases = [
        ({**good, "extra": np.ones(1)}, r"unknown name 'extra'"),
        ({"coef": good["coef"]}, r"missing names \['intercept'\]"),
        ({"coef": np.zeros((2, 3)), "intercept": good["intercept"]}, r"'coef': expected shape \(3, 2\), got \(2, 3\)"),
        (
            {"coef": good["coef"], "intercept": np.zeros(2, dtype=np.float32)},
            r"'intercept': expected dtype float64, got float32",
        ),
        ({"coef": [[0.0] * 2] * 3, "intercept": good["intercept"]}, r"'coef': expected a numpy.ndarray, got list"),
    ]
    for weights, needle in cases:
        with pytest.raises(WeightsMismatchError, match=needle):
            model.set_weights(weights)
        after = model.get_weights()
        for name in before:  # no partial load: the valid entries were not assigned either
            np.testing.assert_array_equal(after[name], before[name])
    with pytest.raises(WeightsMismatchError, match="mapping"):
        model.set_weights([np.zeros((3, 2)), np.zeros(2)])


def test_numpy_set_weights_lists_every_problem_at_once():
    model = NumpyModel(3, 2)
    with pytest.raises(WeightsMismatchError) as info:
        model.set_weights({"coef": np.zeros((3, 3), dtype=np.float16), "bias": np.zeros(2)})
    message = str(info.value)
    for needle in ("unknown name 'bias'", "missing names ['intercept']", "expected shape (3, 2), got (3, 3)",
                   "expected dtype float64, got float16"):
        assert needle in message


def test_numpy_set_weights_copies_its_input():
    model = NumpyModel(2)
    weights = {"coef": np.ones((2, 1)), "intercept": np.ones(1)}
    model.set_weights(weights)
    weights["coef"][:] = 5.0
    np.testing.assert_array_equal(model.get_weights()["coef"], np.ones((2, 1)))


def test_numpy_apply_grads_is_strict():
    model = NumpyModel(2)
    with pytest.raises(WeightsMismatchError, match=r"apply_grads refused.*missing names \['intercept'\]"):
        model.apply_grads({"coef": np.ones((2, 1))}, 0.1)


def test_numpy_export_reload_round_trip(tmp_path):
    source = NumpyModel(3, 4, task="logistic", dtype=np.float32)
    rng = np.random.default_rng(5)
    source.set_weights({"coef": rng.normal(size=(3, 4)).astype(np.float32),
                        "intercept": rng.normal(size=4).astype(np.float32)})
    path = tmp_path / "model.bin"
    source.export(path)
    assert path.exists() and not (tmp_path / "model.bin.npz").exists()  # written at exactly `path`
    target = NumpyModel(7)  # a different config: reload replaces all of it
    target.reload(path)
    assert (target.task, target.n_features, target.n_outputs, target.dtype) == ("logistic", 3, 4, np.float32)
    for name, value in source.get_weights().items():
        np.testing.assert_array_equal(target.get_weights()[name], value)
    X = rng.normal(size=(6, 3))
    np.testing.assert_array_equal(target.predict(X), source.predict(X))


def test_numpy_reload_rejects_foreign_files(tmp_path):
    path = tmp_path / "other.npz"
    np.savez(path, coef=np.zeros((2, 1)))
    with pytest.raises(ModelError, match=r"lacks entries \['intercept', 'task'\]"):
        NumpyModel(2).reload(path)
    bad = tmp_path / "bad.npz"
    np.savez(bad, coef=np.zeros((2, 1)), intercept=np.zeros(3), task=np.array("linear"))
    with pytest.raises(ModelError, match="inconsistent"):
        NumpyModel(2).reload(bad)


# ------------------------------------------------------------------------------------------ TorchModel
def _torch_module() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 2))


def test_torch_get_weights_flags():
    module = _torch_module()
    module[0].weight.requires_grad_(False)
    model = TorchModel(module)
    params = ["0.weight", "0.bias", "1.weight", "1.bias", "2.weight", "2.bias"]
    buffers = ["1.running_mean", "1.running_var", "1.num_batches_tracked"]
    assert list(model.get_weights()) == params
    assert list(model.get_weights(only_trainable=True)) == params[1:]
    assert sorted(model.get_weights(exclude_buffers=False)) == sorted(params + buffers)
    assert model.num_parameters() == 3 * 4 + 4 + 4 + 4 + 4 * 2 + 2
    weights = model.get_weights()
    assert all(not w.requires_grad for w in weights.values())
    weights["2.bias"].add_(1.0)  # a clone: the module is unchanged
    assert not torch.equal(weights["2.bias"], module[2].bias)


def test_torch_set_weights_accepts_tensors_and_numpy_including_read_only():
    model = TorchModel(_torch_module())
    target = {name: torch.randn_like(w) for name, w in model.get_weights(exclude_buffers=False).items()
              if w.is_floating_point()}
    target["1.num_batches_tracked"] = torch.tensor(5)
    model.set_weights(target, exclude_buffers=False)
    for name, value in model.get_weights(exclude_buffers=False).items():
        assert torch.equal(value, target[name])
    as_numpy = {name: w.numpy() * 2 for name, w in model.get_weights().items()}
    for array in as_numpy.values():
        array.flags.writeable = False  # as decoded zero-copy from the wire
    model.set_weights(as_numpy)
    for name, value in model.get_weights().items():
        np.testing.assert_array_equal(value.numpy(), as_numpy[name])
    assert model.model[0].weight.requires_grad  # still a trainable parameter


def test_torch_set_weights_errors_and_no_partial_load():
    module = _torch_module()
    module[2].bias.requires_grad_(False)
    model = TorchModel(module)
    before = model.get_weights(exclude_buffers=False)
    good = model.get_weights()
    cases = [
        ({**good, "nope": torch.zeros(1)}, r"unknown name 'nope'"),
        ({**good, "1.running_mean": torch.zeros(4)}, r"'1.running_mean' \(a buffer: pass exclude_buffers=False"),
        ({k: v for k, v in good.items() if k != "0.bias"}, r"missing names \['0.bias'\]"),
        ({**good, "0.weight": torch.zeros(3, 4)}, r"'0.weight': expected shape \(4, 3\), got \(3, 4\)"),
        ({**good, "0.bias": np.zeros(4)}, r"'0.bias': expected dtype float32, got float64"),
        ({**good, "0.bias": torch.zeros(4, dtype=torch.float16)}, r"expected dtype float32, got float16"),
        ({**good, "0.bias": [0.0] * 4}, r"'0.bias': expected a torch.Tensor or numpy.ndarray, got list"),
    ]
    for weights, needle in cases:
        changed = {k: (v + 1 if isinstance(v, torch.Tensor) and v.is_floating_point() else v)
                   for k, v in weights.items()}
        with pytest.raises(WeightsMismatchError, match=needle):
            model.set_weights(changed)
        for name, value in model.get_weights(exclude_buffers=False).items():
            assert torch.equal(value, before[name]), name
    trainable = model.get_weights(only_trainable=True)
    with pytest.raises(WeightsMismatchError, match=r"'2.bias' \(a frozen parameter: pass only_trainable=False"):
        model.set_weights({**trainable, "2.bias": torch.zeros(2)}, only_trainable=True)
    model.set_weights({k: v * 0 for k, v in trainable.items()}, only_trainable=True)
    assert not module[0].weight.any() and torch.equal(module[2].bias, before["2.bias"])


def test_torch_bfloat16_weights_get_and_set():
    module = torch.nn.Linear(3, 2).to(torch.bfloat16)
    model = TorchModel(module)
    weights = model.get_weights()
    assert all(w.dtype == torch.bfloat16 for w in weights.values())
    new = {name: torch.full_like(w, 1.5) for name, w in weights.items()}
    model.set_weights(new)
    assert torch.equal(module.weight, new["weight"])
    with pytest.raises(WeightsMismatchError, match=r"'bias': expected a bfloat16 torch tensor or a float32 "
                                                   r"numpy array \(narrowed to bfloat16\), got a numpy float64"):
        model.set_weights({"weight": new["weight"], "bias": np.zeros(2, dtype=np.float64)})
    with pytest.raises(WeightsMismatchError, match=r"got a numpy float16 array"):
        model.set_weights({"weight": new["weight"], "bias": np.zeros(2, dtype=np.float16)})
    with pytest.raises(WeightsMismatchError, match=r"'bias': expected dtype bfloat16, got float32"):
        model.set_weights({"weight": new["weight"], "bias": torch.zeros(2)})  # a tensor: no silent narrowing
    with pytest.raises(WeightsMismatchError, match=r"'bias': expected shape \(2,\), got \(3,\)"):
        model.set_weights({"weight": new["weight"], "bias": np.zeros(3, dtype=np.float32)})
    assert torch.equal(module.bias, new["bias"])  # nothing was assigned
    # the wire form widens exactly to float32, and set_weights narrows it back to the same tensors
    wire = weights_to_numpy(model.get_weights())
    assert {a.dtype for a in wire.values()} == {np.dtype(np.float32)}
    model.set_weights(wire)
    assert module.weight.dtype == torch.bfloat16 and torch.equal(module.bias, new["bias"])


def _bfloat16_bits_rne(values: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bits, round to nearest even, recomputed on the bit pattern (finite values)."""
    bits = values.astype(np.float32).view(np.uint32).astype(np.uint64)
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)


def test_torch_bfloat16_set_weights_narrows_float32_by_round_to_nearest_even():
    one = np.float32(1.0).view(np.uint32)
    ulp = 1 << 16  # a bfloat16 ulp in float32 bits at 1.0
    halfway = [one + ulp // 2, one + ulp + ulp // 2]  # ties: 1.0 (even) stays, 1.0+ulp (odd) goes up
    near = [one + ulp // 2 - 1, one + ulp // 2 + 1, one + 1]
    special = np.array([0.0, -0.0, 3.3895314e38, 3.4028235e38, -1e-40, 1e-45], dtype=np.float32)
    rng = np.random.default_rng(3)
    random = rng.standard_normal(1000).astype(np.float32) * np.float32(10.0) ** rng.integers(-30, 30, 1000)
    values = np.concatenate([np.array(halfway + near, dtype=np.uint32).view(np.float32), special,
                             random.astype(np.float32)])
    values = values[np.isfinite(values) & (np.abs(values) < 3.3e38)]  # the bit formula holds below the overflow

    model = TorchModel(torch.nn.Linear(len(values), 1, bias=False).to(torch.bfloat16))
    model.set_weights({"weight": values.reshape(1, -1)})
    got = model.model.weight.detach().view(torch.int16).numpy().view(np.uint16).ravel()
    np.testing.assert_array_equal(got, _bfloat16_bits_rne(values))
    np.testing.assert_array_equal(got[:2], [np.uint16(one >> 16), np.uint16((one + 2 * ulp) >> 16)])
    expected = torch.from_numpy(values).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    np.testing.assert_array_equal(got, expected)  # the same as torch's .to(torch.bfloat16)

    edge = TorchModel(torch.nn.Linear(3, 1, bias=False).to(torch.bfloat16))
    edge.set_weights({"weight": np.array([[3.4028235e38, np.inf, np.nan]], dtype=np.float32)})
    w = edge.model.weight.detach().float().numpy().ravel()
    assert w[0] == np.inf and w[1] == np.inf and np.isnan(w[2])  # beyond bfloat16's range: inf


def test_torch_export_reload_round_trip(tmp_path):
    model = TorchModel(_torch_module())
    x = torch.randn(5, 3)
    model.model.eval()
    expected = model.model(x)
    path = tmp_path / "module.pt"
    model.export(path)
    other = TorchModel(torch.nn.Linear(1, 1))
    other.reload(path)
    other.model.eval()
    assert torch.equal(other.model(x), expected)
    assert list(other.get_weights()) == list(model.get_weights())
    torch.save({"not": "a module"}, tmp_path / "dict.pt")
    with pytest.raises(ModelError, match="holds a dict"):
        other.reload(tmp_path / "dict.pt")


def test_torch_model_rejects_non_module():
    with pytest.raises(ModelError, match="got NumpyModel"):
        TorchModel(NumpyModel(2))


# ------------------------------------------------------------------------------------------ wire helper
def test_weights_to_numpy():
    model = TorchModel(_torch_module())
    wire = weights_to_numpy(model.get_weights())
    for name, tensor in model.get_weights().items():
        assert isinstance(wire[name], np.ndarray)
        np.testing.assert_array_equal(wire[name], tensor.numpy())
    array = np.arange(3.0)
    assert weights_to_numpy({"a": array})["a"] is array
    bf16 = torch.tensor([1.0078125, -3.5, 1e30], dtype=torch.bfloat16)
    np.testing.assert_array_equal(weights_to_numpy({"b": bf16})["b"], bf16.float().numpy())
    grad = torch.ones(2, requires_grad=True) * 2
    np.testing.assert_array_equal(weights_to_numpy({"g": grad})["g"], [2.0, 2.0])
    with pytest.raises(WeightsMismatchError, match="weight 'x': expected a numpy array or a torch tensor, got list"):
        weights_to_numpy({"x": [1.0]})
    # a round trip through the wire form is accepted by set_weights
    model.set_weights(wire)


def test_models_package_imports_without_torch():
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "import numpy as np, fedcore.models as m\n"
        "model = m.NumpyModel(2)\n"
        "assert m.weights_to_numpy(model.get_weights())['coef'].shape == (2, 1)\n"
        "try:\n    m.TorchModel\nexcept ImportError:\n    print('lazy-ok')\n"
    )
    repo_root = Path(__file__).resolve().parents[1]
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=repo_root, check=False, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "lazy-ok"


def test_torch_set_weights_takes_0d_numpy_buffers():
    """BatchNorm's num_batches_tracked is a 0-d int64 buffer: its wire form is a 0-d array."""
    module = torch.nn.BatchNorm1d(3)
    module(torch.randn(4, 3))
    model = TorchModel(module)
    wire = weights_to_numpy(model.get_weights(exclude_buffers=False))
    assert wire["num_batches_tracked"].shape == ()
    fresh = TorchModel(torch.nn.BatchNorm1d(3))
    fresh.set_weights(wire, exclude_buffers=False)
    assert fresh.model.num_batches_tracked.shape == () and int(fresh.model.num_batches_tracked) == 1
    assert torch.equal(fresh.model.running_mean, module.running_mean)
