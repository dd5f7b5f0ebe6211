"""TorchTrainingPlan: real training, the loop's Scaffold and FedProx maths recomputed in numpy, edge cases."""

from __future__ import annotations

import numpy as np
import pytest

from fedcore.errors import PlanError, WeightsMismatchError
from fedcore.models import NumpyModel, weights_to_numpy
from fedcore.plans import ArrayDataset, NumpySGD, TrainingProgress

torch = pytest.importorskip("torch")
from fedcore.models import TorchModel
from fedcore.plans import TorchTrainingPlan

nn = torch.nn


class LinearMSEPlan(TorchTrainingPlan):
    """nn.Linear(4, 2) in float64 with MSE: the gradient has a closed form to recompute in numpy."""

    def init_model(self) -> nn.Module:
        return nn.Linear(4, 2).to(torch.float64)

    def training_step(self, data, target):
        return nn.functional.mse_loss(self.module(data), target)


class MLPPlan(TorchTrainingPlan):
    def init_model(self) -> nn.Module:
        return nn.Sequential(nn.Linear(2, 16), nn.ReLU(), nn.Linear(16, 3))

    def training_step(self, data, target):
        return nn.functional.cross_entropy(self.module(data), target)


def _regression(n: int = 24, seed: int = 0) -> ArrayDataset:
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, 4))
    return ArrayDataset(X, X @ rng.normal(size=(4, 2)) + rng.normal(size=2))


def _blobs(n: int = 240, seed: int = 0) -> ArrayDataset:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 3, size=n)
    X = np.array([[3.0, 0.0], [-3.0, 0.0], [0.0, 3.0]])[labels] + rng.normal(size=(n, 2))
    return ArrayDataset(X, labels)


def _plan(cls: type, args: dict, data: ArrayDataset) -> TorchTrainingPlan:
    plan = cls()
    plan.post_init(args)
    plan.set_dataset(data)
    return plan


def _numpy_grads(w: dict[str, np.ndarray], data: ArrayDataset) -> dict[str, np.ndarray]:
    """MSE of nn.Linear (weight: out × in) recomputed: Z = X Wᵀ + b, G = 2 (Z − Y) / (n k)."""
    G = 2.0 * (data.X @ w["weight"].T + w["bias"] - data.y) / data.y.size
    return {"weight": G.T @ data.X, "bias": G.sum(axis=0)}


def test_torch_plan_learns_a_classifier():
    plan = _plan(MLPPlan, {"epochs": 15, "batch_size": 16, "lr": 0.1, "seed": 0, "test_ratio": 0.25}, _blobs())
    before = plan.evaluate()
    result = plan.train()
    after = plan.evaluate()
    assert result.num_steps == 15 * len(plan.training_data_loader)
    assert after["loss"] < before["loss"] / 3
    assert after["accuracy"] >= 0.9
    valid = plan.validation_dataset
    with torch.no_grad():
        predicted = plan.module(torch.tensor(valid.X, dtype=torch.float32)).argmax(dim=1).numpy()
    assert after["accuracy"] == pytest.approx(np.mean(predicted == valid.y))
    assert plan.module.training  # evaluate restored training mode


@pytest.mark.parametrize(("args", "steps"), [({"num_updates": 7}, 7), ({"epochs": 2}, 6), ({"num_updates": 2}, 2)])
def test_number_of_steps(args, steps):
    plan = _plan(LinearMSEPlan, {**args, "batch_size": 8, "seed": 0}, _regression(24))
    assert len(plan.training_data_loader) == 3
    result = plan.train()
    assert result.num_steps == steps == len(result.losses)
    assert result.num_samples == 8 * steps


def test_scaffold_correction_one_plain_sgd_step_matches_numpy():
    data = _regression()
    plan = _plan(LinearMSEPlan, {"num_updates": 1, "batch_size": len(data), "lr": 0.07, "seed": 1}, data)
    w = weights_to_numpy(plan.get_model_params())
    rng = np.random.default_rng(2)
    delta = {"weight": rng.normal(size=(2, 4)), "bias": rng.normal(size=2)}
    result = plan.train(correction=delta)
    g = _numpy_grads(w, data)
    after = weights_to_numpy(plan.get_model_params())
    for name in w:
        np.testing.assert_allclose(after[name], w[name] - 0.07 * (g[name] - delta[name]), rtol=1e-10, atol=1e-12)
    assert result.lr == 0.07 and result.num_steps == 1


def test_scaffold_correction_applies_to_parameters_without_gradient():
    class Unused(LinearMSEPlan):
        def init_model(self):
            module = super().init_model()
            module.register_parameter("spare", nn.Parameter(torch.zeros(3, dtype=torch.float64)))
            return module

    plan = _plan(Unused, {"num_updates": 1, "batch_size": 24, "lr": 0.5}, _regression())
    plan.train(correction={"spare": torch.tensor([1.0, -2.0, 0.0], dtype=torch.float64)})
    np.testing.assert_allclose(plan.module.spare.detach().numpy(), [0.5, -1.0, 0.0])  # g = 0: w − η(0 − δ)
    with pytest.raises(PlanError, match=r"unknown names \['nope'\]"):
        plan.train(correction={"nope": np.zeros(1)})
    with pytest.raises(PlanError, match=r"'bias': expected shape \(2,\), got \(3,\)"):
        plan.train(correction={"bias": np.zeros(3)})


def test_fedprox_adds_mu_times_distance_to_the_gradient():
    data = _regression()
    args = {"num_updates": 1, "batch_size": len(data), "lr": 0.1, "seed": 3}
    plain = _plan(LinearMSEPlan, args, data)
    prox = _plan(LinearMSEPlan, {**args, "fedprox_mu": 0.3}, data)
    w = weights_to_numpy(plain.get_model_params())
    prox.set_model_params(w)
    rng = np.random.default_rng(4)
    w0 = {name: value + rng.normal(size=value.shape) for name, value in w.items()}
    plain.train()
    prox.train(global_params=w0)
    g = _numpy_grads(w, data)
    for name in w:
        expected = w[name] - 0.1 * (g[name] + 0.3 * (w[name] - w0[name]))
        np.testing.assert_allclose(prox.get_model_params()[name].numpy(), expected, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(plain.get_model_params()[name].numpy(), w[name] - 0.1 * g[name], rtol=1e-10)


def test_fedprox_and_scaffold_together():
    data = _regression()
    plan = _plan(LinearMSEPlan, {"num_updates": 1, "batch_size": len(data), "lr": 0.2, "fedprox_mu": 2.0}, data)
    w = weights_to_numpy(plan.get_model_params())
    w0 = {name: np.zeros_like(v) for name, v in w.items()}
    delta = {name: np.full_like(v, 0.5) for name, v in w.items()}
    plan.train(correction=delta, global_params=w0)
    g = _numpy_grads(w, data)
    for name in w:
        expected = w[name] - 0.2 * (g[name] + 2.0 * w[name] - delta[name])
        np.testing.assert_allclose(plan.get_model_params()[name].numpy(), expected, rtol=1e-10, atol=1e-12)


def test_nan_loss_raises_and_leaves_the_weights():
    class NanPlan(LinearMSEPlan):
        def training_step(self, data, target):
            return super().training_step(data, target) * float("nan")

    plan = _plan(NanPlan, {"num_updates": 3, "batch_size": 8}, _regression())
    before = plan.get_model_params()
    with pytest.raises(PlanError, match=r"non-finite loss nan at step 1 \(epoch 1, batch 1\)"):
        plan.train()
    for name, value in plan.get_model_params().items():
        assert torch.equal(value, before[name])

    class VectorLoss(LinearMSEPlan):
        def training_step(self, data, target):
            return (self.module(data) - target) ** 2

    with pytest.raises(PlanError, match=r"scalar loss tensor, got a tensor of shape \(8, 2\)"):
        _plan(VectorLoss, {"num_updates": 1, "batch_size": 8}, _regression()).train()


def test_progress_reports():
    reports: list[TrainingProgress] = []
    plan = _plan(LinearMSEPlan, {"epochs": 2, "batch_size": 10, "log_interval": 2}, _regression(24))
    result = plan.train(progress=reports.append)
    assert [(r.epoch, r.iteration, r.total_iterations) for r in reports] == [
        (1, 1, 3), (1, 2, 3), (1, 3, 3), (2, 1, 3), (2, 3, 3),  # step 4 = epoch 2 batch 1 (every 2 steps)
    ]
    assert [(r.num_samples, r.num_samples_max) for r in reports] == [(10, 30), (20, 30), (24, 24), (10, 30), (24, 24)]
    assert reports[-1].loss == result.losses[-1]


def test_default_loader_dtypes_and_seeded_determinism():
    def run(seed: int) -> tuple[dict, list]:
        plan = _plan(MLPPlan, {"num_updates": 5, "batch_size": 16, "seed": seed}, _blobs(64))
        X, y = next(iter(plan.training_data_loader))
        assert (X.dtype, y.dtype) == (torch.float32, torch.int64)
        return plan.get_model_params(), plan.train().losses

    (init_a, losses_a), (init_b, losses_b), (init_c, _) = run(5), run(5), run(6)
    assert all(torch.equal(init_a[k], init_b[k]) for k in init_a) and losses_a == losses_b
    assert not torch.equal(init_a["0.weight"], init_c["0.weight"])


def test_model_params_round_trip_export_import(tmp_path):
    plan = _plan(MLPPlan, {"num_updates": 3, "batch_size": 16, "seed": 0}, _blobs(64))
    params = {name: torch.randn_like(value) for name, value in plan.get_model_params().items()}
    plan.set_model_params(params)
    assert all(torch.equal(plan.get_model_params()[k], v) for k, v in params.items())
    plan.set_model_params(weights_to_numpy(params))  # the wire form is accepted as is
    assert all(torch.equal(plan.after_training_params()[k], v) for k, v in params.items())
    with pytest.raises(WeightsMismatchError, match=r"missing names \['2.bias'\]"):
        plan.set_model_params({k: v for k, v in params.items() if k != "2.bias"})

    path = tmp_path / "plan.pt"
    plan.export_model(path)
    other = _plan(MLPPlan, {"num_updates": 3, "batch_size": 16, "seed": 1}, _blobs(64))
    other.import_model(path)
    assert all(torch.equal(other.get_model_params()[k], v) for k, v in params.items())
    other.train()  # the rebuilt optimizer steps the reloaded module
    assert not torch.equal(other.module[0].weight, params["0.weight"])


def test_bfloat16_module_through_the_plan():
    class BF16Plan(MLPPlan):
        def init_model(self):
            return super().init_model().to(torch.bfloat16)

    plan = _plan(BF16Plan, {"num_updates": 4, "batch_size": 16, "lr": 0.1, "seed": 0}, _blobs(64))
    params = plan.get_model_params()
    assert {v.dtype for v in params.values()} == {torch.bfloat16}
    X, _ = next(iter(plan.training_data_loader))
    assert X.dtype == torch.bfloat16
    result = plan.train(correction={k: np.zeros(v.shape, dtype=np.float32) for k, v in params.items()})
    assert result.num_steps == 4
    trained = plan.get_model_params()
    plan.set_model_params(params)
    assert all(torch.equal(plan.get_model_params()[k], v) for k, v in params.items())
    plan.set_model_params(weights_to_numpy(trained))  # the wire form (float32) is narrowed back exactly
    assert all(torch.equal(plan.get_model_params()[k], v) for k, v in trained.items())
    with pytest.raises(WeightsMismatchError, match="got a numpy float64 array"):
        plan.set_model_params({k: v.astype(np.float64) for k, v in weights_to_numpy(trained).items()})


def test_numpy_sgd_matches_torch_sgd_with_momentum_and_weight_decay():
    rng = np.random.default_rng(7)
    w = {"coef": rng.normal(size=(3, 1)), "intercept": rng.normal(size=1)}
    grads = [{k: rng.normal(size=v.shape) for k, v in w.items()} for _ in range(4)]
    model = NumpyModel(3)
    model.set_weights(w)
    ours = NumpySGD(lr=0.05, momentum=0.8, weight_decay=0.1)
    tensors = {k: torch.tensor(v, requires_grad=True) for k, v in w.items()}
    theirs = torch.optim.SGD(tensors.values(), lr=0.05, momentum=0.8, weight_decay=0.1)
    for g in grads:
        ours.step(model, g)
        for name, tensor in tensors.items():
            tensor.grad = torch.tensor(g[name])
        theirs.step()
    for name, tensor in tensors.items():
        np.testing.assert_allclose(model.get_weights()[name], tensor.detach().numpy(), rtol=1e-12)


def test_torch_plan_misuse():
    class NotAModule(TorchTrainingPlan):
        def init_model(self):
            return NumpyModel(2)

        def training_step(self, data, target):
            return torch.zeros(())

    with pytest.raises(PlanError, match="init_model must return a torch.nn.Module, got NumpyModel"):
        NotAModule().post_init({"num_updates": 1})

    class BadOptimizer(LinearMSEPlan):
        def init_optimizer(self):
            return NumpySGD(0.1)

    with pytest.raises(PlanError, match="init_optimizer must return a torch.optim.Optimizer, got NumpySGD"):
        BadOptimizer().post_init({"num_updates": 1})

    class Wrapped(LinearMSEPlan):
        def init_model(self):
            return TorchModel(super().init_model())

    plan = Wrapped()
    plan.post_init({"num_updates": 1})
    assert isinstance(plan.model, TorchModel)
