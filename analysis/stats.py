"""Confidence intervals over seeds: Student-t intervals for a mean and for Δ% against a baseline.

No scipy (it is not a dependency of the project): the t quantile is computed from the exact t CDF
(regularised incomplete beta function, continued fraction) by bisection; it matches scipy to 1e-6
also at the fractional degrees of freedom of Welch's interval (checked in the tests).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz; Numerical Recipes 6.4)."""
    tiny, qab, qap, qam = 1e-300, a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 300):
        m2 = 2 * m
        for aa in (m * (b - m) * x / ((qam + m2) * (a + m2)), -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))):
            d = 1.0 + aa * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + aa / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            break
    return h


def _betainc(a: float, b: float, x: float) -> float:
    """The regularised incomplete beta function I_x(a, b)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t with `df` (possibly fractional) degrees of freedom."""
    tail = 0.5 * _betainc(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t >= 0 else tail


def _t_pdf(t: float, df: float) -> float:
    log_c = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)
    return math.exp(log_c - (df + 1) / 2 * math.log1p(t * t / df))


@lru_cache(maxsize=4096)
def t975(df: float) -> float:
    """The 0.975 quantile of Student's t (two-sided 95%); df may be fractional (Welch); inf -> normal.

    Newton's method on the exact CDF, kept inside a shrinking bracket (bisection when a step leaves it).
    """
    if math.isnan(df) or df <= 0:
        return math.nan
    if math.isinf(df) or df > 1e7:
        return 1.959963984540054
    lo, hi = 0.0, 20.0
    while t_cdf(hi, df) < 0.975:  # df < 1 has very heavy tails
        lo, hi = hi, hi * 2.0
    x = min(max(1.96, lo), hi)
    for _ in range(100):
        f = t_cdf(x, df) - 0.975
        if abs(f) < 1e-13:
            break
        lo, hi = (x, hi) if f < 0 else (lo, x)
        step = x - f / _t_pdf(x, df)
        x = step if lo < step < hi else 0.5 * (lo + hi)
        if hi - lo < 1e-12:
            break
    return x


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
