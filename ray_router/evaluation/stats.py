"""Mean and 95% confidence interval over seeds (Student t)."""

from __future__ import annotations

import math

import numpy as np


def t975(df: int) -> float:
    """The two-sided 95% Student-t quantile t_{0.975, df} (NaN for df < 1)."""
    if df < 1:
        return float("nan")
    from scipy.stats import t  # imported on first use: scipy.stats takes a while to import

    return float(t.ppf(0.975, df))


def mean_ci95(values: np.ndarray, axis: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean and the 95% t-interval of the mean along ``axis``: returns (mean, low, high).

    With one value the interval collapses to the value itself (no spread can be estimated)."""
    v = np.asarray(values, dtype=np.float64)
    n = v.shape[axis]
    mean = v.mean(axis=axis)
    if n < 2:
        return mean, mean.copy(), mean.copy()
    half = t975(n - 1) * v.std(axis=axis, ddof=1) / math.sqrt(n)
    return mean, mean - half, mean + half
