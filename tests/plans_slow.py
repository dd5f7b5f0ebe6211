"""A numpy linear-regression plan whose every training step takes ``STEP_SECONDS`` (end-to-end tests).

This module's source is what nodes approve and run: a task of 200 steps trains for 40 s, so a test can close
it mid-training and see that the node stops at its next batch instead of training on.
"""

import time

import numpy as np

from fedcore.models import NumpyModel
from fedcore.plans import NumpyTrainingPlan

STEP_SECONDS = 0.2


class SlowLinearPlan(NumpyTrainingPlan):
    def init_model(self) -> NumpyModel:
        return NumpyModel(n_features=3, n_outputs=1, task="linear", dtype=np.float32)

    def training_step(self, data, target):
        time.sleep(STEP_SECONDS)
        return super().training_step(data, target)
