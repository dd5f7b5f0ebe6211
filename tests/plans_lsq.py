"""A numpy linear-regression plan used by the experiment tests (its module source is what nodes run).

float32 parameters: the aggregators sum float32 values in float64, which is exact, so results do not
depend on the order replies arrive in and resumed runs match uninterrupted ones bit for bit.
"""

import numpy as np

from fedcore.models import NumpyModel
from fedcore.plans import NumpyTrainingPlan


class LinearPlan(NumpyTrainingPlan):
    def init_model(self) -> NumpyModel:
        return NumpyModel(n_features=3, n_outputs=1, task="linear", dtype=np.float32)
