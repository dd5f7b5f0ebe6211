"""What the low-memory, reload and round-lifetime tests share: training args, a dataset, x, a byte comparison."""

from __future__ import annotations

import numpy as np

from fedcore.wire import DatasetInfo

ARGS = {"num_updates": 10, "lr": 0.02, "batch_size": 16, "seed": 7, "shuffle": True}
DATASET = DatasetInfo(name="d", tags=("lsq",), num_samples=10, shape=(3,), dtype="float32", format="npz")
CHUNK = 64 << 10


def fresh_x(shift: float = 0.0, *, big: int = 100_000, seed: int = 3) -> dict[str, np.ndarray]:
    """x of LinearPlan (``coef`` 3×1, ``+ shift``) plus a ``big`` float32 block, the same for the same arguments."""
    rng = np.random.default_rng(seed)
    return {"coef": rng.standard_normal((3, 1)).astype(np.float32) + np.float32(shift),
            "big": rng.standard_normal(big).astype(np.float32)}


def same_bytes(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> bool:
    """Same names in the same order, same dtypes, same bytes."""
    return list(a) == list(b) and all(a[k].dtype == b[k].dtype and a[k].tobytes() == b[k].tobytes() for k in a)
