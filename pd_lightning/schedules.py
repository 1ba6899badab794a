"""α schedules and learning-rate multipliers: pure functions of training progress t ∈ [0, 1].

t = step / total_steps (clamped to [0, 1]). The paper (Table 5) names the schedules but not their
phase lengths; one summary reports 10% warmup and a peak α of 0.9. The defaults below are this
project's choices, each with its reason:

- α schedules take `alpha`, the α of the schedule's long phase: the constant value, the end points
  of the linear ramps (Linear Inc 0 → alpha, Linear Dec alpha → 0), the peak of Period and of
  WSD-α, and the stable-phase value of WSD-β (there β = 1 - α runs 0 → 1-alpha → 0, so α runs
  1 → alpha → 1). DEFAULT_ALPHA = 0.9: the best constant α of Table 4 and the summary's peak.
- α WSD phases: warmup 10% (the summary's number), decay 10% (mirrors warmup; unknown), linear.
- LR warmup 1% (a common LLM pre-training choice; 10% would waste a tenth of the budget at low LR).
- LR WSD decay 10% with shape "1-sqrt" (MiniCPM uses ~10% decay; Hägele et al. 2024 found 1-sqrt
  the best cooldown shape), down to 0; cosine decays to 10% of the peak (Chinchilla's convention).
- Period: α = alpha · ½(1 - cos(2π·periods·t)), 4 periods: starts and ends at 0 (the paper gives
  only "oscillates periodically"; the smooth cosine wave averages alpha / 2 like any symmetric one).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from pd_lightning.errors import ConfigError, choice_error

ALPHA_SCHEDULES = ("constant", "linear_inc", "linear_dec", "period", "wsd_alpha", "wsd_beta")
LR_SCHEDULES = ("constant", "cosine", "wsd")
DECAY_SHAPES = ("linear", "1-sqrt")

DEFAULT_ALPHA = 0.9
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


def alpha_at(
    t: float,
    schedule: str = "constant",
    alpha: float = DEFAULT_ALPHA,
    *,
    periods: int = DEFAULT_PERIODS,
    warmup: float = DEFAULT_ALPHA_WARMUP,
    decay: float = DEFAULT_ALPHA_DECAY,
    decay_shape: str = DEFAULT_ALPHA_DECAY_SHAPE,
) -> float:
    """α(t) for an α schedule; `alpha` is the long-phase value (see the module docstring)."""
    if schedule not in ALPHA_SCHEDULES:
        raise choice_error("loss.alpha_schedule", schedule, ALPHA_SCHEDULES)
    if not 0.0 <= float(alpha) <= 1.0:
        raise ConfigError(f"loss.alpha={alpha!r} is out of range; expected a number in [0, 1]")
    t = _clamp01(t)
    if schedule == "constant":
        return float(alpha)
    if schedule == "linear_inc":
        return alpha * t
    if schedule == "linear_dec":
        return alpha * (1.0 - t)
    if schedule == "period":
        if int(periods) < 1:
            raise ConfigError(f"loss.alpha_periods={periods!r} is out of range; expected an integer >= 1")
        return alpha * 0.5 * (1.0 - math.cos(2.0 * math.pi * int(periods) * t))
    shape = wsd_shape(t, warmup, decay, decay_shape)
    if schedule == "wsd_alpha":
        return alpha * shape
    return 1.0 - (1.0 - alpha) * shape  # wsd_beta: β = (1 - alpha)·shape


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
    if schedule not in LR_SCHEDULES:
        raise choice_error("optim.lr_schedule", schedule, LR_SCHEDULES)
    t = _clamp01(t)
    if schedule == "constant":
        return 1.0
    if min_ratio is None:
        min_ratio = DEFAULT_COSINE_MIN_RATIO if schedule == "cosine" else DEFAULT_WSD_MIN_RATIO
    if not 0.0 <= min_ratio <= 1.0:
        raise ConfigError(f"optim.min_lr_ratio={min_ratio!r} is out of range; expected a fraction in [0, 1]")
    if schedule == "wsd":
        if decay_shape not in DECAY_SHAPES:
            raise choice_error("optim.decay_shape", decay_shape, DECAY_SHAPES)
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
    if int(total_steps) < 1:
        raise ConfigError(f"trainer.max_steps={total_steps!r} is out of range; expected an integer >= 1")
    lr_multiplier(0.0, schedule, **kw)
    total = int(total_steps)
    return lambda step: lr_multiplier(step / total, schedule, **kw)


def lambda_lr(optimizer: torch.optim.Optimizer, schedule: str, total_steps: int,
              **kw) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR whose multiplier at optimizer step s is lr_multiplier(s / total_steps, schedule, **kw)."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, make_lr_lambda(schedule, total_steps, **kw))


@dataclass(frozen=True)
class PDSetting:
    """One Table 5 configuration: distance, α schedule (with its α) and LR schedule."""

    loss_kind: str
    alpha_schedule: str
    alpha: float
    lr_schedule: str


# Table 5 rows by their printed names. Assumptions, as the paper leaves them open: the rows without
# "LR" use the default cosine LR (the 0-α+WSD-LR row exists because the plain LLM-LM baseline did not
# use WSD; LLM-LM is that baseline, added as the Δ reference); schedule rows use the vanilla distance NLL (LLM-NLL is the vanilla PD row, Table 1 = LLM-KD);
# linear and period rows span α ∈ [0, 1] (paper: "Linear Inc (α 0→1)"); WSD rows use the peak α 0.9.
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
    "WSD-β+WSD-LR": PDSetting("nll", "wsd_beta", DEFAULT_ALPHA, "wsd"),
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
