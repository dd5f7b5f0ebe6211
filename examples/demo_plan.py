"""The demo's training plan: a small MLP classifier trained with cross-entropy.

This whole module is what nodes receive, approve (by its SHA-256) and run, so it imports only what a node
has: torch and fedcore.
"""

import torch

from fedcore.plans import TorchTrainingPlan


class DemoPlan(TorchTrainingPlan):
    """20 features → 32 hidden units → 10 classes."""

    def init_model(self) -> torch.nn.Module:
        return torch.nn.Sequential(torch.nn.Linear(20, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10))

    def training_step(self, data: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.cross_entropy(self.module(data), target)
