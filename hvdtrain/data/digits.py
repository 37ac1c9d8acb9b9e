"""scikit-learn's digits (1,797 8x8 images) and its fixed stratified train/test split, without importing
scikit-learn: importing it (with SciPy) costs every rank about 2 s of CPU at start-up. The images are read from the
CSV that scikit-learn ships, and the split is StratifiedShuffleSplit's, step by step, so it is the very split of
`train_test_split(x, y, test_size=f, random_state=0, stratify=y)` (tests/unit/test_data.py compares the two).
"""
from __future__ import annotations

import functools
import importlib.util
import math
from pathlib import Path

import numpy as np

from hvdtrain.errors import DataError


@functools.lru_cache(maxsize=1)   # read once per process: the train and test splits both come from it
def load() -> tuple[np.ndarray, np.ndarray]:
    """(images (1797, 8, 8) float64 in 0..16, labels (1797,) int64), as sklearn.datasets.load_digits gives them.
    Shared: index them (a copy), never write to them."""
    spec = importlib.util.find_spec("sklearn")   # finds the package without running it
    path = Path(spec.origin).parent / "datasets" / "data" / "digits.csv.gz" if spec and spec.origin else None
    if path is None or not path.is_file():
        raise DataError("the digits data comes with scikit-learn, which is not installed here: pip install \"hvdtrain[data]\"")
    data = np.loadtxt(path, delimiter=",")
    return data[:, :-1].reshape(-1, 8, 8), data[:, -1].astype(np.int64)


def split(y: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, test) indices of StratifiedShuffleSplit(test_size=test_fraction, random_state=seed)'s first split."""
    n_test = math.ceil(test_fraction * len(y))
    n_train = len(y) - n_test
    _, y_indices, counts = np.unique(y, return_inverse=True, return_counts=True)
    by_class = np.split(np.argsort(y_indices, kind="stable"), np.cumsum(counts)[:-1])
    rng = np.random.RandomState(seed)
    n_i = _approximate_mode(counts, n_train, rng)
    t_i = _approximate_mode(counts - n_i, n_test, rng)
    train, test = [], []
    for i, members in enumerate(by_class):
        shuffled = members.take(rng.permutation(counts[i]), mode="clip")
        train.extend(shuffled[:n_i[i]])
        test.extend(shuffled[n_i[i]:n_i[i] + t_i[i]])
    return rng.permutation(train), rng.permutation(test)


def _approximate_mode(counts: np.ndarray, draws: int, rng) -> np.ndarray:
    """Per class, its share of `draws` rounded down; the remainder goes to the largest fractions, ties drawn by rng."""
    continuous = counts / counts.sum() * draws
    floored = np.floor(continuous)
    missing = int(draws - floored.sum())
    remainder = continuous - floored
    for value in np.sort(np.unique(remainder))[::-1]:
        if missing <= 0:
            break
        (tied,) = np.where(remainder == value)
        chosen = rng.choice(tied, size=min(len(tied), missing), replace=False)
        floored[chosen] += 1
        missing -= len(chosen)
    return floored.astype(int)
