"""fedcore.plans without torch: datasets, loader, NumpySGD and NumpyTrainingPlan's loop and maths."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fedcore.errors import (
    DatasetError,
    PlanError,
    TrainingArgsError,
    TrainingArgsWarning,
    WeightsMismatchError,
)
from fedcore.models import NumpyModel
from fedcore.plans import (
    ArrayDataset,
    NumpyDataLoader,
    NumpySGD,
    NumpyTrainingPlan,
    TrainingProgress,
    TrainingResult,
)


class LinearPlan(NumpyTrainingPlan):
    def init_model(self) -> NumpyModel:
        return NumpyModel(4, 2)


class LogisticPlan(NumpyTrainingPlan):
    def init_model(self) -> NumpyModel:
        return NumpyModel(2, 3, task="logistic")


def _regression(n: int = 40, seed: int = 0) -> ArrayDataset:
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, 4))
    Y = X @ rng.normal(size=(4, 2)) + rng.normal(size=2) + 0.1 * rng.normal(size=(n, 2))
    return ArrayDataset(X, Y)


def _plan(args: dict, data: ArrayDataset | None = None, cls: type = LinearPlan) -> NumpyTrainingPlan:
    plan = cls()
    plan.post_init(args)
    plan.set_dataset(data if data is not None else _regression())
    return plan


def _grads(W: np.ndarray, b: np.ndarray, X: np.ndarray, Y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """MSE gradients recomputed here: L = mean((XW + b − Y)²), G = 2 (Z − Y) / (n k)."""
    G = 2.0 * (X @ W + b - Y) / Y.size
    return X.T @ G, G.sum(axis=0)


def _random_weights(plan: NumpyTrainingPlan, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    weights = {name: rng.normal(size=w.shape) for name, w in plan.get_model_params().items()}
    plan.set_model_params(weights)
    return weights


# ------------------------------------------------------------------------------------------ datasets
def test_array_dataset_validation():
    with pytest.raises(DatasetError, match="X must be a numpy.ndarray, got list"):
        ArrayDataset([[1.0]], np.zeros(1))
    with pytest.raises(DatasetError, match="y must have at least one dimension"):
        ArrayDataset(np.zeros((1, 2)), np.array(1.0))
    with pytest.raises(DatasetError, match=r"X has 3 samples \(shape \(3, 2\)\) but y has 2"):
        ArrayDataset(np.zeros((3, 2)), np.zeros(2))
    assert len(ArrayDataset(np.zeros((0, 2)), np.zeros(0))) == 0


def test_array_dataset_split():
    data = ArrayDataset(np.arange(20.0).reshape(10, 2), np.arange(10))
    train, test = data.split(0.35, seed=1)
    assert (len(train), len(test)) == (7, 3)  # floor(10 · 0.35) held out
    assert sorted(np.concatenate([train.y, test.y]).tolist()) == list(range(10))
    np.testing.assert_array_equal(train.X[:, 0], 2 * train.y)  # rows stay paired
    again, _ = data.split(0.35, seed=1)
    np.testing.assert_array_equal(again.y, train.y)
    assert any(not np.array_equal(data.split(0.35, seed=s)[1].y, test.y) for s in range(2, 6))
    assert len(data.split(0.0)[1]) == 0
    for bad in (1.0, -0.1, "0.5", True):
        with pytest.raises(DatasetError, match="test_ratio must be a number in"):
            data.split(bad)
    with pytest.raises(DatasetError, match="leaves no training sample"):
        ArrayDataset(np.zeros((0, 1)), np.zeros(0)).split(0.5)


def test_numpy_data_loader_batches_and_reshuffles_deterministically():
    data = ArrayDataset(np.arange(10.0)[:, None], np.arange(10))
    loader = NumpyDataLoader(data, batch_size=4, shuffle=True, seed=3)
    assert len(loader) == 3 and loader.batch_size == 4
    epochs = [list(loader) for _ in range(3)]
    for batches in epochs:
        assert [len(y) for _, y in batches] == [4, 4, 2]
        assert sorted(np.concatenate([y for _, y in batches]).tolist()) == list(range(10))
        for X, y in batches:
            np.testing.assert_array_equal(X[:, 0], y)
    orders = [np.concatenate([y for _, y in batches]).tolist() for batches in epochs]
    assert orders[0] != orders[1] or orders[1] != orders[2]  # a new permutation per epoch
    replay = NumpyDataLoader(data, batch_size=4, shuffle=True, seed=3)
    assert [np.concatenate([y for _, y in list(replay)]).tolist() for _ in range(3)] == orders
    in_order = NumpyDataLoader(data, batch_size=3, shuffle=False)
    assert np.concatenate([y for _, y in in_order]).tolist() == list(range(10)) and len(in_order) == 4
    for bad in (0, 2.0, True):
        with pytest.raises(DatasetError, match="batch_size must be an integer >= 1"):
            NumpyDataLoader(data, batch_size=bad)
    with pytest.raises(DatasetError, match="needs an ArrayDataset"):
        NumpyDataLoader((data.X, data.y), batch_size=2)


# ------------------------------------------------------------------------------------------ NumpySGD
def test_numpy_sgd_momentum_and_weight_decay_rule():
    model = NumpyModel(2)
    w = {"coef": np.array([[1.0], [-2.0]]), "intercept": np.array([0.5])}
    model.set_weights(w)
    opt = NumpySGD(lr=0.1, momentum=0.9, weight_decay=0.01)
    g1 = {"coef": np.array([[0.3], [0.1]]), "intercept": np.array([-1.0])}
    g2 = {"coef": np.array([[-0.2], [0.4]]), "intercept": np.array([2.0])}
    opt.step(model, g1)
    opt.step(model, g2)
    for name, w_start in w.items():
        d1 = g1[name] + 0.01 * w_start  # step 1: b = g + λ w
        w1 = w_start - 0.1 * d1
        b2 = 0.9 * d1 + (g2[name] + 0.01 * w1)  # step 2: b = μ b + g + λ w
        np.testing.assert_allclose(model.get_weights()[name], w1 - 0.1 * b2)
    for kwargs in ({"lr": 0.0}, {"lr": 0.1, "momentum": -1.0}, {"lr": float("nan")}):
        with pytest.raises(PlanError, match="NumpySGD"):
            NumpySGD(**kwargs)


# ------------------------------------------------------------------------------------------ loop
@pytest.mark.parametrize(
    ("args", "steps"),
    [  # 40 samples in batches of 10: a loader of length 4
        ({"num_updates": 7}, 7),
        ({"num_updates": 3}, 3),
        ({"epochs": 2}, 8),
        ({"epochs": 3, "batch_maxnum": 2}, 6),
        ({"epochs": 5, "dry_run": True}, 1),
    ],
)
def test_number_of_steps_follows_the_accountant(args, steps):
    plan = _plan({**args, "batch_size": 10, "lr": 0.01, "seed": 0})
    assert len(plan.training_data_loader) == 4
    result = plan.train()
    assert isinstance(result, TrainingResult)
    assert result.num_steps == steps == len(result.losses)
    assert result.num_samples == steps * 10
    assert result.lr == 0.01 and result.duration_s >= 0


def test_num_updates_wins_over_epochs():
    with pytest.warns(TrainingArgsWarning, match="num_updates"):
        plan = _plan({"epochs": 2, "batch_maxnum": 3, "num_updates": 5, "batch_size": 10})
    assert plan.train().num_steps == 5


def test_num_updates_over_a_partial_last_batch_counts_samples():
    plan = _plan({"num_updates": 5, "batch_size": 16, "shuffle": False}, _regression(40))
    result = plan.train()  # batches of 16, 16, 8, then 16, 16
    assert (result.num_steps, result.num_samples) == (5, 72)


def test_plan_linear_regression_reaches_lstsq():
    data = _regression(60)
    plan = _plan({"epochs": 400, "batch_size": 60, "lr": 0.3, "seed": 1}, data)
    result = plan.train()
    solution, *_ = np.linalg.lstsq(np.hstack([data.X, np.ones((60, 1))]), data.y, rcond=None)
    params = plan.get_model_params()
    np.testing.assert_allclose(params["coef"], solution[:4], atol=1e-6)
    np.testing.assert_allclose(params["intercept"], solution[4], atol=1e-6)
    assert result.losses[-1] < result.losses[0]
    assert plan.evaluate(data)["loss"] == pytest.approx(np.mean((data.X @ solution[:4] + solution[4] - data.y) ** 2))


def test_plan_logistic_regression_learns_and_evaluates_weighted():
    rng = np.random.default_rng(2)
    labels = rng.integers(0, 3, size=203)
    X = np.array([[3.0, 0.0], [-3.0, 0.0], [0.0, 3.0]])[labels] + rng.normal(size=(203, 2))
    plan = _plan({"num_updates": 300, "batch_size": 16, "lr": 0.2, "seed": 0, "test_ratio": 0.25},
                 ArrayDataset(X, labels), LogisticPlan)
    assert len(plan.validation_dataset) == 50
    plan.train()
    metrics = plan.evaluate()
    valid = plan.validation_dataset
    assert metrics["accuracy"] == pytest.approx(np.mean(plan.model.predict(valid.X) == valid.y))
    assert metrics["accuracy"] >= 0.9
    # batches of 16 over 50 samples (16, 16, 16, 2): the weighted mean is the loss over all samples
    assert metrics["loss"] == pytest.approx(plan.model.loss(valid.X, valid.y))


def test_scaffold_correction_one_plain_sgd_step():
    data = _regression(12)
    plan = _plan({"num_updates": 1, "batch_size": 12, "lr": 0.05, "shuffle": False}, data)
    w = _random_weights(plan, 3)
    rng = np.random.default_rng(4)
    delta = {"coef": rng.normal(size=(4, 2)), "intercept": rng.normal(size=2)}
    result = plan.train(correction=delta)
    gW, gb = _grads(w["coef"], w["intercept"], data.X, data.y)
    after = plan.get_model_params()
    np.testing.assert_allclose(after["coef"], w["coef"] - 0.05 * (gW - delta["coef"]), rtol=1e-12)
    np.testing.assert_allclose(after["intercept"], w["intercept"] - 0.05 * (gb - delta["intercept"]), rtol=1e-12)
    assert result.num_steps == 1 and result.lr == 0.05


def test_scaffold_correction_may_name_a_subset_and_is_checked():
    data = _regression(12)
    plan = _plan({"num_updates": 1, "batch_size": 12, "lr": 0.05, "shuffle": False}, data)
    w = _random_weights(plan, 5)
    plan.train(correction={"intercept": np.ones(2, dtype=np.float32)})
    gW, gb = _grads(w["coef"], w["intercept"], data.X, data.y)
    np.testing.assert_allclose(plan.get_model_params()["coef"], w["coef"] - 0.05 * gW, rtol=1e-12)
    np.testing.assert_allclose(plan.get_model_params()["intercept"], w["intercept"] - 0.05 * (gb - 1.0))
    with pytest.raises(PlanError, match=r"unknown names \['bias'\]"):
        plan.train(correction={"bias": np.ones(2)})
    with pytest.raises(PlanError, match=r"'coef': expected shape \(4, 2\), got \(2, 4\)"):
        plan.train(correction={"coef": np.ones((2, 4))})
    with pytest.raises(PlanError, match="correction must be a mapping"):
        plan.train(correction=[np.ones(2)])


def test_fedprox_adds_mu_times_distance_to_the_gradient():
    data = _regression(12)
    args = {"num_updates": 1, "batch_size": 12, "lr": 0.1, "shuffle": False}
    plain, prox = _plan(args, data), _plan({**args, "fedprox_mu": 0.7}, data)
    w = _random_weights(plain, 6)
    prox.set_model_params(w)
    w0 = {name: value + np.random.default_rng(7).normal(size=value.shape) for name, value in w.items()}
    plain.train()
    result = prox.train(global_params=w0)
    for name in w:  # the only difference is the step along mu · (w − w0)
        np.testing.assert_allclose(
            prox.get_model_params()[name] - plain.get_model_params()[name], -0.1 * 0.7 * (w[name] - w0[name]),
            atol=1e-12,
        )
    # the reported loss is the batch loss, without the proximal term
    assert result.losses[0] == pytest.approx(np.mean((data.X @ w["coef"] + w["intercept"] - data.y) ** 2))


def test_fedprox_gradient_matches_finite_differences_of_the_objective():
    data = _regression(12)
    mu, lr = 0.4, 1e-3
    plan = _plan({"num_updates": 1, "batch_size": 12, "lr": lr, "shuffle": False, "fedprox_mu": mu}, data)
    w = _random_weights(plan, 8)
    w0 = {name: np.zeros_like(value) for name, value in w.items()}
    model = NumpyModel(4, 2)

    def objective(flat: np.ndarray) -> float:
        weights = {"coef": flat[:8].reshape(4, 2), "intercept": flat[8:]}
        model.set_weights(weights)
        return model.loss(data.X, data.y) + mu / 2 * sum(np.sum(v**2) for v in weights.values())

    flat = np.concatenate([w["coef"].ravel(), w["intercept"]])
    eps = 1e-6
    numeric = np.array([(objective(flat + eps * e) - objective(flat - eps * e)) / (2 * eps) for e in np.eye(10)])
    plan.train(global_params=w0)
    after = plan.get_model_params()
    step = np.concatenate([(w["coef"] - after["coef"]).ravel(), w["intercept"] - after["intercept"]]) / lr
    np.testing.assert_allclose(step, numeric, rtol=1e-6, atol=1e-8)


def test_fedprox_default_anchor_is_the_start_weights_and_global_params_are_checked():
    data = _regression(12)
    args = {"num_updates": 1, "batch_size": 12, "lr": 0.1, "shuffle": False}
    plain, prox = _plan(args, data), _plan({**args, "fedprox_mu": 5.0}, data)
    prox.set_model_params(_random_weights(plain, 9))
    plain.train()
    prox.train()  # anchor = weights at the start: the first step equals plain SGD
    for name, value in plain.get_model_params().items():
        np.testing.assert_allclose(prox.get_model_params()[name], value, atol=1e-12)
    with pytest.raises(PlanError, match=r"global_params does not match the model: missing names \['intercept'\]"):
        prox.train(global_params={"coef": np.zeros((4, 2))})


def test_nan_loss_raises_plan_error_naming_the_step_and_skips_that_update():
    class NanAtStep3(LinearPlan):
        def __init__(self) -> None:
            super().__init__()
            self.calls = 0

        def training_step(self, data, target):
            self.calls += 1
            loss, grads = super().training_step(data, target)
            return (float("nan") if self.calls == 3 else loss), grads

    args = {"num_updates": 5, "batch_size": 10, "lr": 0.01, "shuffle": False}
    plan = _plan(args, cls=NanAtStep3)
    with pytest.raises(PlanError, match=r"non-finite loss nan at step 3 \(epoch 1, batch 3\)"):
        plan.train()
    reference = _plan({**args, "num_updates": 2})  # steps 1-2 were applied, step 3 was not
    reference.train()
    for name, value in reference.get_model_params().items():
        np.testing.assert_array_equal(plan.get_model_params()[name], value)

    data = _regression()
    data.X[0, 0] = np.inf
    infected = _plan({"num_updates": 4, "batch_size": 40}, data)
    before = infected.get_model_params()
    with pytest.raises(PlanError, match="non-finite loss .* at step 1"):
        infected.train()
    for name, value in infected.get_model_params().items():
        np.testing.assert_array_equal(value, before[name])


def test_progress_callback_values():
    reports: list[TrainingProgress] = []
    plan = _plan({"num_updates": 25, "batch_size": 10, "log_interval": 10, "lr": 0.01})
    result = plan.train(progress=reports.append)
    assert [r.iteration for r in reports] == [1, 10, 20, 25]
    assert all(r.epoch is None and r.total_iterations == 25 for r in reports)
    assert [r.num_samples for r in reports] == [10, 100, 200, 250]
    assert [r.num_samples_max for r in reports] == [250, 250, 250, 250]
    assert [r.loss for r in reports] == [result.losses[i - 1] for i in (1, 10, 20, 25)]

    reports.clear()
    plan = _plan({"epochs": 2, "batch_size": 16, "log_interval": 100, "lr": 0.01})  # 40 samples: 16, 16, 8
    plan.train(progress=reports.append)
    assert [(r.epoch, r.iteration, r.total_iterations) for r in reports] == [(1, 1, 3), (1, 3, 3), (2, 1, 3), (2, 3, 3)]
    assert [(r.num_samples, r.num_samples_max) for r in reports] == [(16, 48), (40, 40), (16, 48), (40, 40)]
    assert all(math.isfinite(r.loss) for r in reports)


def test_same_seed_same_training_different_seed_different_shuffle():
    def run(seed: int) -> dict[str, np.ndarray]:
        plan = _plan({"num_updates": 6, "batch_size": 8, "lr": 0.05, "seed": seed})
        plan.train()
        return plan.get_model_params()

    a, b, c = run(11), run(11), run(12)
    for name in a:
        np.testing.assert_array_equal(a[name], b[name])
    assert not np.array_equal(a["coef"], c["coef"])


def test_model_params_round_trip_and_strictness(tmp_path):
    plan = _plan({"num_updates": 3, "batch_size": 10})
    weights = _random_weights(plan, 10)
    got = plan.get_model_params()
    for name in weights:
        np.testing.assert_array_equal(got[name], weights[name])
    plan.train()
    after = plan.after_training_params()
    for name, value in plan.get_model_params().items():
        np.testing.assert_array_equal(after[name], value)
    with pytest.raises(WeightsMismatchError, match=r"'coef': expected shape \(4, 2\), got \(4, 3\)"):
        plan.set_model_params({"coef": np.zeros((4, 3)), "intercept": np.zeros(2)})

    path = tmp_path / "plan_model.npz"
    plan.export_model(path)
    other = _plan({"num_updates": 2, "batch_size": 10, "momentum": 0.5})
    other.import_model(path)
    for name, value in after.items():
        np.testing.assert_array_equal(other.get_model_params()[name], value)
    assert other.train().num_steps == 2  # the optimizer was rebuilt over the reloaded model


def test_plan_misuse_raises_plan_errors():
    plan = LinearPlan()
    with pytest.raises(PlanError, match=r"call post_init\(training_args\) first"):
        plan.set_dataset(_regression())
    with pytest.raises(PlanError, match="post_init"):
        plan.get_model_params()
    with pytest.raises(PlanError, match="post_init"):
        plan.evaluate(_regression())
    with pytest.raises(TrainingArgsError, match="unknown training argument"):
        plan.post_init({"epoch": 1})
    plan.post_init({"num_updates": 1})
    with pytest.raises(PlanError, match=r"call set_dataset\(train\) before train\(\)"):
        plan.train()
    with pytest.raises(PlanError, match="no validation data"):
        plan.evaluate()
    with pytest.raises(DatasetError, match="train must be an ArrayDataset, got tuple"):
        plan.set_dataset((np.zeros((2, 4)), np.zeros((2, 2))))
    with pytest.raises(DatasetError, match="the training set is empty"):
        plan.set_dataset(ArrayDataset(np.zeros((0, 4)), np.zeros((0, 2))))

    class NotNumpy(NumpyTrainingPlan):
        def init_model(self):
            return object()

    with pytest.raises(PlanError, match="init_model must return a NumpyModel, got object"):
        NotNumpy().post_init({"num_updates": 1})

    class BadGrads(LinearPlan):
        def training_step(self, data, target):
            loss, grads = super().training_step(data, target)
            return loss, {"coef": grads["coef"]}

    with pytest.raises(PlanError, match=r"gradients for \['coef'\], expected exactly \['coef', 'intercept'\]"):
        _plan({"num_updates": 1}, cls=BadGrads).train()

    class LossOnly(LinearPlan):
        def training_step(self, data, target):
            return 1.0

    with pytest.raises(PlanError, match=r"must return \(loss, grads dict\), got float"):
        _plan({"num_updates": 1}, cls=LossOnly).train()


def test_plans_package_trains_without_torch():
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "import numpy as np\n"
        "from fedcore.models import NumpyModel\n"
        "from fedcore.plans import ArrayDataset, NumpyTrainingPlan\n"
        "class P(NumpyTrainingPlan):\n"
        "    def init_model(self):\n"
        "        return NumpyModel(2)\n"
        "p = P(); p.post_init({'num_updates': 3, 'seed': 0})\n"
        "p.set_dataset(ArrayDataset(np.ones((5, 2)), np.ones(5)))\n"
        "print(p.train().num_steps)\n"
        "import fedcore.plans as plans\n"
        "try:\n    plans.TorchTrainingPlan\nexcept ImportError:\n    print('lazy-ok')\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[1],
        check=False, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["3", "lazy-ok"]
