"""A bfloat16 torch linear-regression plan used by the bfloat16 round tests (its source is what nodes run).

The module lives in bfloat16 on the nodes; its weights travel as float32 arrays (numpy has no bfloat16)
and ``TorchModel.set_weights`` narrows them back.
"""

import torch

from fedcore.plans import TorchTrainingPlan


class BF16LinearPlan(TorchTrainingPlan):
    def init_model(self) -> torch.nn.Module:
        return torch.nn.Linear(3, 1).to(torch.bfloat16)

    def training_step(self, data, target):
        return torch.nn.functional.mse_loss(self.module(data).float(), target.float())
