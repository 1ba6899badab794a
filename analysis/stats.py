"""Confidence intervals over seeds: Student-t intervals for a mean and for Δ% against a baseline.

The t quantile is scipy's, fractional degrees of freedom included (Welch's interval).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import scipy.stats


@lru_cache(maxsize=4096)
def t975(df: float) -> float:
    """The 0.975 quantile of Student's t (two-sided 95%); df may be fractional (Welch); inf -> normal."""
    if math.isnan(df) or df <= 0:
        return math.nan
    return float(scipy.stats.t.ppf(0.975, df))


def mean_ci(values: np.ndarray | list[float]) -> tuple[float, float]:
    """Mean and the half-width of its 95% t-interval; the half-width is NaN with fewer than 2 values."""
    v = np.asarray(values, dtype=float)
    v = v[~np.isnan(v)]
    if v.size == 0:
        return math.nan, math.nan
    if v.size < 2:
        return float(v.mean()), math.nan
    return float(v.mean()), t975(v.size - 1) * float(v.std(ddof=1)) / math.sqrt(v.size)


@dataclass(frozen=True)
class Delta:
    """Δ% = 100 (mean(config) / mean(baseline) - 1) with its 95% half-width (NaN when unknown)."""

    value: float
    ci95: float

    @property
    def excludes_zero(self) -> bool:
        """True when the interval is known and lies entirely above or below zero."""
        return bool(np.isfinite(self.ci95) and abs(self.value) > self.ci95)


def delta_ci(config: np.ndarray | list[float], baseline: np.ndarray | list[float]) -> Delta:
    """Δ% of `config`'s mean against `baseline`'s mean, and its 95% interval.

    Method (delta method + Welch-Satterthwaite): the seeds of the configuration and of the baseline
    are independent samples, so Var(Δ) ≈ (100/m_b)² s_c²/n_c + (100 m_c/m_b²)² s_b²/n_b, and the
    t quantile uses the Welch-Satterthwaite degrees of freedom of the two terms.

    When only one side has ≥ 2 seeds (common: one baseline run, three seeds of a configuration), its
    sample variance stands in for the other side's too — i.e. seed noise is assumed equal across
    configurations — with that side's n - 1 degrees of freedom. Ignoring the single-seed side's noise
    instead would make the interval too narrow. With one seed on both sides there is no interval.
    """
    c = np.asarray(config, dtype=float)
    b = np.asarray(baseline, dtype=float)
    c, b = c[~np.isnan(c)], b[~np.isnan(b)]
    if c.size == 0 or b.size == 0:
        return Delta(math.nan, math.nan)
    m_c, m_b = float(c.mean()), float(b.mean())
    if m_b == 0:
        return Delta(math.nan, math.nan)
    value = 100.0 * (m_c / m_b - 1.0)
    g_c, g_b = 100.0 / m_b, 100.0 * m_c / m_b**2  # ∂Δ/∂m_c and -∂Δ/∂m_b
    if c.size >= 2 and b.size >= 2:
        v_c = g_c**2 * c.var(ddof=1) / c.size
        v_b = g_b**2 * b.var(ddof=1) / b.size
        var = v_c + v_b
        if var == 0:
            return Delta(value, 0.0)
        df = var**2 / (v_c**2 / (c.size - 1) + v_b**2 / (b.size - 1))
    elif c.size >= 2 or b.size >= 2:
        pooled = c if c.size >= 2 else b
        s2 = pooled.var(ddof=1)
        var = s2 * (g_c**2 / c.size + g_b**2 / b.size)
        df = pooled.size - 1
    else:
        return Delta(value, math.nan)
    return Delta(value, t975(df) * math.sqrt(var))


CI_METHODS = ("auto", "pooled", "welch")
AUTO_MIN_SEEDS = 3  # "auto": Welch when both sides have this many seeds, else the pooled variance


def pooled_variance(samples: list[np.ndarray] | list[list[float]]) -> tuple[float, int]:
    """The within-configuration variance pooled over configurations, and its degrees of freedom.

    s² = Σ (n_i - 1) s_i² / Σ (n_i - 1) over every configuration with at least two seeds: the error
    term of a one-way layout (ANOVA; Dunnett's comparisons with a control use it too). It assumes
    seed noise is alike across the configurations of a table, which is what lets two seeds per row
    give an interval at all: with Welch, n = 2 on both sides leaves 1–2 degrees of freedom.
    """
    num, df = 0.0, 0
    for s in samples:
        v = np.asarray(s, dtype=float)
        v = v[~np.isnan(v)]
        if v.size >= 2:
            num += float(((v - v.mean()) ** 2).sum())
            df += v.size - 1
    return (num / df, df) if df else (math.nan, 0)


def mean_ci_pooled(values: np.ndarray | list[float], s2: float, df: int) -> tuple[float, float]:
    """Mean and the 95% half-width with a pooled variance `s2` on `df` degrees of freedom."""
    v = np.asarray(values, dtype=float)
    v = v[~np.isnan(v)]
    if v.size == 0:
        return math.nan, math.nan
    if not df or not np.isfinite(s2):
        return float(v.mean()), math.nan
    return float(v.mean()), t975(df) * math.sqrt(s2 / v.size)


def delta_ci_pooled(config: np.ndarray | list[float], baseline: np.ndarray | list[float], s2: float, df: int) -> Delta:
    """Δ% against the baseline with the pooled variance: Var(Δ) ≈ s² ((100/m_b)²/n_c + (100 m_c/m_b²)²/n_b)."""
    c = np.asarray(config, dtype=float)
    b = np.asarray(baseline, dtype=float)
    c, b = c[~np.isnan(c)], b[~np.isnan(b)]
    if c.size == 0 or b.size == 0 or float(b.mean()) == 0:
        return Delta(math.nan, math.nan)
    m_c, m_b = float(c.mean()), float(b.mean())
    value = 100.0 * (m_c / m_b - 1.0)
    if not df or not np.isfinite(s2):
        return Delta(value, math.nan)
    var = s2 * ((100.0 / m_b) ** 2 / c.size + (100.0 * m_c / m_b**2) ** 2 / b.size)
    return Delta(value, t975(df) * math.sqrt(var))
