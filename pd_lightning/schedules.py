"""α schedules and learning-rate multipliers: pure functions of training progress t ∈ [0, 1].

t = step / total_steps (clamped to [0, 1]). The paper (Table 5) names the schedules but not their
phase lengths; one summary reports 10% warmup and a peak α of 0.9. The defaults below are this
project's choices, each with its reason. Loss: L = (1 - α)·L_lm + α·L_kd, β = 1 - α (the LM share).

α(t) of each schedule (`alpha` = `loss.alpha`, `peak` = `loss.wsd_peak`, s(t) = wsd_shape(t) ∈ [0, 1]):
- constant:   α = alpha.
- linear_inc: α = alpha·t            (paper: "Linear Inc (α 0→1)", so Table 5 uses alpha = 1).
- linear_dec: α = alpha·(1 - t)      (Table 5: alpha = 1).
- period:     α = alpha·½(1 - cos(2π·periods·t)), 4 periods: starts and ends at 0 (the paper gives
  only "oscillates periodically"; the smooth cosine wave averages alpha / 2 like any symmetric one).
- wsd_alpha:  α = P·s(t), P = peak if set, else alpha: α runs 0 → P → 0. Table 5 and the quickstart
  use alpha = 0.9 (the summary's peak; also the best constant α of Table 4, +3.6%).
- wsd_beta:   β = P·s(t), α = 1 - P·s(t), P = peak if set, else DEFAULT_WSD_BETA_PEAK = 0.9:
  β runs 0 → 0.9 → 0, so α runs 1 → 0.1 → 1. `alpha` is not used (α starts and ends at 1 by
  definition; the config requires loss.alpha = 1, which also keeps the teacher's logits loaded).
  The paper says only "WSD-β denotes applying the WSD scheduler to the proportion of LM loss"; the
  peak of β is this project's inference from the printed numbers (Table 5 Δ vs LLM-LM):
    WSD-β+WSD-LR +1.1%, 0-α+WSD-LR (LM only, WSD-LR) +1.2%, 1-α+WSD-LR (α = 1, WSD-LR) +5.0%;
    Table 4 (cosine LR): α = 0.1 → +0.1%, α = 0.9 → +3.6%, α = 1.0 → +1.6%.
  β peaking at 0.9 (α = 0.1 for the stable 80%) is an LM-dominated run with WSD-LR: α = 0.1 adds
  about nothing to LM-only (+0.1%), so it should land near 0-α+WSD-LR's +1.2%, as the printed +1.1%
  does. β peaking at 0.1 (α 1 → 0.9 → 1, the WSD-α peak mirrored) would differ from 1-α+WSD-LR only
  by α = 0.9 instead of 1 in the stable phase, which Table 4 says helps, so it should score about
  +5% or more, not +1.1%. That reading stays reachable with loss.wsd_peak = 0.1 (the code's former
  one: β peaked at 1 - alpha = 0.1).
- α WSD phases: warmup 10% (the summary's number), decay 10% (mirrors warmup; unknown), linear.
- LR warmup 1% (a common LLM pre-training choice; 10% would waste a tenth of the budget at low LR).
- LR WSD decay 10% with shape "1-sqrt" (MiniCPM uses ~10% decay; Hägele et al. 2024 found 1-sqrt
  the best cooldown shape), down to 0; cosine decays to 10% of the peak (Chinchilla's convention).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

# The schedule names and the ranges of their settings are declared with the config fields (and stay
# importable from here).
from pd_lightning.config import ALPHA_SCHEDULES, LR_SCHEDULES  # noqa: F401
from pd_lightning.config import DECAY_SHAPES, WSD_ALPHA_SCHEDULES, check_field
from pd_lightning.errors import ConfigError, choice_error

DEFAULT_ALPHA = 0.9
DEFAULT_WSD_BETA_PEAK = 0.9  # β's peak for wsd_beta (α 1 → 0.1 → 1): the reading that fits Table 5's +1.1%
DEFAULT_ALPHA_WARMUP = 0.1
DEFAULT_ALPHA_DECAY = 0.1
DEFAULT_ALPHA_DECAY_SHAPE = "linear"
DEFAULT_PERIODS = 4
DEFAULT_LR_WARMUP = 0.01
DEFAULT_LR_DECAY = 0.1
DEFAULT_LR_DECAY_SHAPE = "1-sqrt"
DEFAULT_COSINE_MIN_RATIO = 0.1
DEFAULT_WSD_MIN_RATIO = 0.0


def _check_phases(field: str, warmup: float, decay: float) -> None:
    """Phase fractions must be in [0, 1] and leave the stable phase non-negative."""
    for name, v in (("warmup", warmup), ("decay", decay)):
        if not 0.0 <= v <= 1.0:
            raise ConfigError(f"{field}.{name}={v!r} is out of range; expected a fraction in [0, 1]")
    if warmup + decay > 1.0:
        raise ConfigError(f"{field}.warmup+decay={warmup + decay!r} is out of range; expected at most 1")


def _clamp01(t: float) -> float:
    return min(1.0, max(0.0, float(t)))


def wsd_shape(t: float, warmup: float, decay: float, decay_shape: str = "linear", floor: float = 0.0) -> float:
    """Warmup–stable–decay in [floor, 1]: t/warmup, then 1, then 1 → floor over the last `decay` of t.

    Decay progress s = (t - (1 - decay)) / decay; linear: 1 - s, 1-sqrt: 1 - √s; value = floor + (1 - floor)·f.
    """
    if decay_shape not in DECAY_SHAPES:
        raise choice_error("schedule.decay_shape", decay_shape, DECAY_SHAPES)
    _check_phases("schedule", warmup, decay)
    t = _clamp01(t)
    if warmup > 0.0 and t < warmup:
        return t / warmup
    start = 1.0 - decay
    if decay == 0.0 or t <= start:
        return 1.0
    s = 1.0 if t >= 1.0 else min(1.0, (t - start) / decay)  # exact end value despite 1 - decay rounding
    f = 1.0 - s if decay_shape == "linear" else 1.0 - math.sqrt(s)
    return floor + (1.0 - floor) * f


def wsd_peak_of(schedule: str, alpha: float = DEFAULT_ALPHA, peak: float | None = None) -> float:
    """Peak of the quantity a WSD α schedule scales: α for wsd_alpha (None: `alpha`), β for wsd_beta (None: 0.9)."""
    if schedule not in WSD_ALPHA_SCHEDULES:
        raise ConfigError(f"loss.wsd_peak={peak!r} is not used by loss.alpha_schedule={schedule!r}; "
                          f"expected one of {', '.join(WSD_ALPHA_SCHEDULES)}")
    if peak is None:
        return float(alpha) if schedule == "wsd_alpha" else DEFAULT_WSD_BETA_PEAK
    return check_field("loss.wsd_peak", float(peak))


def alpha_at(
    t: float,
    schedule: str = "constant",
    alpha: float = DEFAULT_ALPHA,
    *,
    periods: int = DEFAULT_PERIODS,
    warmup: float = DEFAULT_ALPHA_WARMUP,
    decay: float = DEFAULT_ALPHA_DECAY,
    decay_shape: str = DEFAULT_ALPHA_DECAY_SHAPE,
    peak: float | None = None,
) -> float:
    """α(t) for an α schedule (formulas in the module docstring); `peak` (loss.wsd_peak) only for the WSD ones."""
    check_field("loss.alpha_schedule", schedule)
    check_field("loss.alpha", float(alpha))
    if peak is not None and schedule not in WSD_ALPHA_SCHEDULES:
        wsd_peak_of(schedule, alpha, peak)  # raises: a peak would be silently ignored
    t = _clamp01(t)
    if schedule == "constant":
        return float(alpha)
    if schedule == "linear_inc":
        return alpha * t
    if schedule == "linear_dec":
        return alpha * (1.0 - t)
    if schedule == "period":
        check_field("loss.alpha_periods", periods)
        return alpha * 0.5 * (1.0 - math.cos(2.0 * math.pi * periods * t))
    p = wsd_peak_of(schedule, alpha, peak)
    shape = wsd_shape(t, warmup, decay, decay_shape)
    if schedule == "wsd_alpha":
        return p * shape  # α = peak·shape: 0 → peak → 0
    return 1.0 - p * shape  # wsd_beta: β = peak·shape, α = 1 - β: 1 → 1 - peak → 1


def lr_multiplier(
    t: float,
    schedule: str = "cosine",
    *,
    warmup: float = DEFAULT_LR_WARMUP,
    decay: float = DEFAULT_LR_DECAY,
    decay_shape: str = DEFAULT_LR_DECAY_SHAPE,
    min_ratio: float | None = None,
) -> float:
    """LR / peak LR at progress t.

    constant: 1.  cosine: t/warmup, then min + (1-min)·½(1 + cos(π·s)), s = (t - warmup)/(1 - warmup)
    (`decay` unused).  wsd: wsd_shape(t, warmup, decay, decay_shape, floor=min).
    min_ratio None = 0.1 for cosine, 0 for wsd.
    """
    check_field("optim.lr_schedule", schedule)
    t = _clamp01(t)
    if schedule == "constant":
        return 1.0
    if min_ratio is None:
        min_ratio = DEFAULT_COSINE_MIN_RATIO if schedule == "cosine" else DEFAULT_WSD_MIN_RATIO
    check_field("optim.min_lr_ratio", float(min_ratio))
    if schedule == "wsd":
        check_field("optim.decay_shape", decay_shape)
        _check_phases("optim", warmup, decay)
        return wsd_shape(t, warmup, decay, decay_shape, floor=min_ratio)
    _check_phases("optim", warmup, 0.0)
    if warmup > 0.0 and t < warmup:
        return t / warmup
    s = 1.0 if warmup >= 1.0 else (t - warmup) / (1.0 - warmup)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * s))


def make_alpha_schedule(schedule: str = "constant", alpha: float = DEFAULT_ALPHA, **kw) -> Callable[[float], float]:
    """Validate once, return t ↦ α(t)."""
    alpha_at(0.0, schedule, alpha, **kw)  # raises ConfigError on bad names/values before training starts
    return lambda t: alpha_at(t, schedule, alpha, **kw)


def make_lr_lambda(schedule: str, total_steps: int, **kw) -> Callable[[int], float]:
    """Validate once, return step ↦ multiplier at t = step / total_steps."""
    total = check_field("trainer.max_steps", int(total_steps))
    lr_multiplier(0.0, schedule, **kw)
    return lambda step: lr_multiplier(step / total, schedule, **kw)


def lambda_lr(optimizer: torch.optim.Optimizer, schedule: str, total_steps: int,
              **kw) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR whose multiplier at optimizer step s is lr_multiplier(s / total_steps, schedule, **kw)."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, make_lr_lambda(schedule, total_steps, **kw))


@dataclass(frozen=True)
class PDSetting:
    """One Table 5 configuration: distance, α schedule (with its α and WSD peak) and LR schedule."""

    loss_kind: str
    alpha_schedule: str
    alpha: float  # loss.alpha
    lr_schedule: str
    wsd_peak: float | None = None  # loss.wsd_peak (None: the schedule's default, see wsd_peak_of)


# Table 5 rows by their printed names. Assumptions, as the paper leaves them open: the rows without
# "LR" use the default cosine LR (the 0-α+WSD-LR row exists because the plain LLM-LM baseline did not
# use WSD; LLM-LM is that baseline, added as the Δ reference); schedule rows use the vanilla distance NLL (LLM-NLL is the vanilla PD row, Table 1 = LLM-KD);
# linear and period rows span α ∈ [0, 1] (paper: "Linear Inc (α 0→1)"); WSD-α rows peak at α 0.9; WSD-β
# peaks at β 0.9 (α 1 → 0.1 → 1: the reading that fits the printed +1.1%, see the module docstring).
TABLE5_ROWS: dict[str, PDSetting] = {
    "LLM-LM": PDSetting("nll", "constant", 0.0, "cosine"),  # the Δ reference of every table
    "0-α+WSD-LR": PDSetting("nll", "constant", 0.0, "wsd"),
    "LLM-NLL": PDSetting("nll", "constant", 1.0, "cosine"),
    "LLM-KLD": PDSetting("kld", "constant", 1.0, "cosine"),
    "LLM-MSE": PDSetting("mse", "constant", 1.0, "cosine"),
    "Linear Inc": PDSetting("nll", "linear_inc", 1.0, "cosine"),
    "Linear Dec": PDSetting("nll", "linear_dec", 1.0, "cosine"),
    "Period": PDSetting("nll", "period", 1.0, "cosine"),
    "1-α+WSD-LR": PDSetting("nll", "constant", 1.0, "wsd"),
    "WSD-α+Cos-LR": PDSetting("nll", "wsd_alpha", DEFAULT_ALPHA, "cosine"),
    "WSD-β+WSD-LR": PDSetting("nll", "wsd_beta", 1.0, "wsd", wsd_peak=DEFAULT_WSD_BETA_PEAK),
    "WSD-α+WSD-LR": PDSetting("nll", "wsd_alpha", DEFAULT_ALPHA, "wsd"),
}


def _row_key(name: str) -> str:
    """Loose spelling: case, spaces, 'LLM-' prefix, 'alpha'/'beta' for α/β, trailing ' α'."""
    k = str(name).replace("alpha", "α").replace("beta", "β").replace("Alpha", "α").replace("Beta", "β")
    k = "".join(k.split()).lower()
    k = k.removeprefix("llm-")
    return k.removesuffix("α") if k.startswith(("linear", "period")) else k


_ROW_INDEX = {_row_key(k): k for k in TABLE5_ROWS}


def table5_row(name: str) -> PDSetting:
    """The PDSetting of a Table 5 row; accepts e.g. 'WSD-α + WSD-LR', 'wsd-alpha+wsd-lr', 'NLL', 'Linear Inc α'."""
    key = _ROW_INDEX.get(_row_key(name))
    if key is None:
        raise choice_error("table5_row", name, TABLE5_ROWS)
    return TABLE5_ROWS[key]
