"""Deterministic non-IID demo data: 10 Gaussian classes in 20 dimensions, label-skewed across 3 sites.

Site 0 holds mostly classes 0-3, site 1 classes 4-6, site 2 classes 7-9 (2% of each other class), so local
optima differ and client drift is real. ``python examples/demo_data.py OUT_DIR`` writes one NPZ per site
(``X`` float32, ``y`` int64) plus ``test.npz``, a balanced held-out set for the researcher's report.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

GROUPS = ([0, 1, 2, 3], [4, 5, 6], [7, 8, 9])
N_FEATURES, N_CLASSES = 20, 10


def make_sites(seed: int = 0, per_site: int = 600) -> tuple[list[tuple[np.ndarray, np.ndarray]], tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((N_CLASSES, N_FEATURES))
    sites = []
    for group in GROUPS:
        probs = np.full(N_CLASSES, 0.02)
        probs[group] = 1.0
        y = rng.choice(N_CLASSES, size=per_site, p=probs / probs.sum())
        X = centers[y] + 1.2 * rng.standard_normal((per_site, N_FEATURES))
        sites.append((X.astype(np.float32), y.astype(np.int64)))
    y_test = rng.integers(0, N_CLASSES, 2000)
    X_test = centers[y_test] + 1.2 * rng.standard_normal((2000, N_FEATURES))
    return sites, (X_test.astype(np.float32), y_test.astype(np.int64))


def write(out_dir: Path, seed: int = 0) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    sites, (X_test, y_test) = make_sites(seed)
    paths = []
    for i, (X, y) in enumerate(sites):
        path = out_dir / f"site{i}.npz"
        np.savez(path, X=X, y=y)
        paths.append(path)
    np.savez(out_dir / "test.npz", X=X_test, y=y_test)
    return paths


if __name__ == "__main__":
    for p in write(Path(sys.argv[1] if len(sys.argv) > 1 else "demo-data")):
        print(p)
