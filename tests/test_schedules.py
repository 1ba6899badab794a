"""α and LR schedules: values at phase boundaries, shapes, Table 5 rows, LambdaLR, bad names."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from pd_lightning.config import load_config
from pd_lightning.errors import ConfigError
from pd_lightning.losses import LOSS_KINDS
from pd_lightning.schedules import (
    ALPHA_SCHEDULES,
    DECAY_SHAPES,
    DEFAULT_WSD_BETA_PEAK,
    LR_SCHEDULES,
    TABLE5_ROWS,
    alpha_at,
    lambda_lr,
    lr_multiplier,
    make_alpha_schedule,
    table5_row,
    wsd_peak_of,
    wsd_shape,
)

approx = pytest.approx
SWEEPS = Path(__file__).resolve().parents[1] / "sweeps"


def test_alpha_constant_and_linear_end_points():
    for t in (0.0, 0.3, 1.0):
        assert alpha_at(t, "constant", 0.7) == 0.7
    assert alpha_at(0.0, "linear_inc", 0.8) == 0.0 and alpha_at(1.0, "linear_inc", 0.8) == approx(0.8)
    assert alpha_at(0.25, "linear_inc", 0.8) == approx(0.2)
    assert alpha_at(0.0, "linear_dec", 0.8) == approx(0.8) and alpha_at(1.0, "linear_dec", 0.8) == 0.0
    assert alpha_at(0.25, "linear_dec", 0.8) == approx(0.6)


@pytest.mark.parametrize("periods", [1, 3, 4])
def test_period_hits_zero_and_peak(periods):
    for j in range(periods + 1):
        assert alpha_at(j / periods, "period", 0.9, periods=periods) == approx(0.0, abs=1e-12)
    for j in range(periods):
        assert alpha_at((j + 0.5) / periods, "period", 0.9, periods=periods) == approx(0.9)
    assert alpha_at(0.25 / periods, "period", 0.9, periods=periods) == approx(0.45)


def test_wsd_alpha_phase_boundaries_unchanged():
    kw = dict(warmup=0.1, decay=0.2)
    assert alpha_at(0.0, "wsd_alpha", 0.9, **kw) == 0.0
    assert alpha_at(0.05, "wsd_alpha", 0.9, **kw) == approx(0.45)
    assert alpha_at(0.1, "wsd_alpha", 0.9, **kw) == approx(0.9)
    assert alpha_at(0.8, "wsd_alpha", 0.9, **kw) == approx(0.9)
    assert alpha_at(0.9, "wsd_alpha", 0.9, **kw) == approx(0.45)
    assert alpha_at(1.0, "wsd_alpha", 0.9, **kw) == approx(0.0, abs=1e-12)
    # loss.wsd_peak, when set, is α's peak; unset it is loss.alpha (the quickstart's and Table 5's 0.9)
    assert alpha_at(0.5, "wsd_alpha", 1.0, peak=0.9) == approx(0.9)
    assert wsd_peak_of("wsd_alpha", 0.9) == 0.9 and wsd_peak_of("wsd_alpha", 0.9, 0.7) == 0.7


def test_wsd_beta_default_peaks_beta_at_point_nine():
    """β = 1 - α peaks at 0.9, so α runs 1 → 0.1 → 1 (before: β peaked at 1 - 0.9 = 0.1, α 1 → 0.9 → 1)."""
    kw = dict(warmup=0.1, decay=0.2)
    for alpha in (0.9, 1.0):  # `alpha` is not a value of wsd_beta: α starts and ends at 1
        assert alpha_at(0.0, "wsd_beta", alpha, **kw) == 1.0
        assert alpha_at(0.05, "wsd_beta", alpha, **kw) == approx(0.55)
        assert alpha_at(0.1, "wsd_beta", alpha, **kw) == approx(0.1)
        assert 1 - alpha_at(0.5, "wsd_beta", alpha, **kw) == approx(0.9)  # β at the stable phase
        assert alpha_at(0.8, "wsd_beta", alpha, **kw) == approx(0.1)
        assert alpha_at(1.0, "wsd_beta", alpha, **kw) == approx(1.0)
    assert wsd_peak_of("wsd_beta") == DEFAULT_WSD_BETA_PEAK == 0.9


def test_table5_wsd_beta_row_and_config_give_alpha_one_to_point_one_to_one():
    row = table5_row("WSD-β+WSD-LR")
    assert (row.alpha_schedule, row.alpha, row.wsd_peak, row.lr_schedule) == ("wsd_beta", 1.0, 0.9, "wsd")
    ts, want = (0.0, 0.05, 0.5, 0.95, 1.0), (1.0, 0.55, 0.1, 0.55, 1.0)
    assert [alpha_at(t, row.alpha_schedule, row.alpha, peak=row.wsd_peak) for t in ts] == approx(list(want))
    for overrides in ([], ["loss.wsd_peak=0.9"]):  # the packaged default and the sweep row's explicit peak
        c = load_config("tiny", ["loss.alpha_schedule=wsd_beta", *overrides]).loss
        got = [alpha_at(t, c.alpha_schedule, c.alpha, periods=c.alpha_periods, warmup=c.alpha_warmup_frac,
                        decay=c.alpha_decay_frac, peak=c.wsd_peak) for t in ts]
        assert got == approx(list(want))


def test_wsd_beta_other_reading_is_reachable_by_config():
    """loss.wsd_peak=0.1: β peaks at 0.1, α runs 1 → 0.9 → 1 (the code's former reading)."""
    c = load_config("tiny", ["loss.alpha_schedule=wsd_beta", "loss.wsd_peak=0.1"]).loss
    assert c.wsd_peak == 0.1
    ts = (0.0, 0.05, 0.5, 0.95, 1.0)
    got = [alpha_at(t, c.alpha_schedule, c.alpha, warmup=c.alpha_warmup_frac, decay=c.alpha_decay_frac,
                    peak=c.wsd_peak) for t in ts]
    assert got == approx([1.0, 0.95, 0.9, 0.95, 1.0])


def test_module_alpha_threads_wsd_peak():
    from pd_lightning.config import LossConfig, OptimConfig
    from pd_lightning.module import DistillationModule

    m = DistillationModule(torch.nn.Linear(1, 1), loss=LossConfig(alpha_schedule="wsd_beta", wsd_peak=0.1),
                           optim=OptimConfig(), max_steps=100)
    m.progress = lambda: 0.5
    assert m.alpha() == approx(0.9)


def test_sweep_wsd_rows_keep_their_alpha_curves():
    """Every sweep row with a WSD α schedule: WSD-α still peaks at α 0.9, WSD-β at β 0.9."""
    rows = []
    for path in sorted(SWEEPS.glob("*.yaml")):
        for row in (yaml.safe_load(path.read_text()) or {}).get("rows") or []:
            if str(row.get("set", {}).get("loss.alpha_schedule", "")).startswith("wsd_"):
                rows.append((path.name, row["set"]))
    assert {name for name, _ in rows} >= {"quickstart.yaml", "table5_loss_schedules.yaml"}
    for name, s in rows:
        c = load_config("tiny", [f"{k}={v}" for k, v in s.items() if k.startswith("loss.")]).loss
        stable = alpha_at(0.5, c.alpha_schedule, c.alpha, peak=c.wsd_peak)
        assert stable == approx(0.9 if c.alpha_schedule == "wsd_alpha" else 0.1), (name, s)


def test_default_alpha_wsd_is_ten_percent_warmup_and_decay_to_peak_point_nine():
    assert alpha_at(0.1, "wsd_alpha") == approx(0.9) and alpha_at(0.9, "wsd_alpha") == approx(0.9)
    assert alpha_at(0.05, "wsd_alpha") == approx(0.45) and alpha_at(0.95, "wsd_alpha") == approx(0.45)


@pytest.mark.parametrize("shape", DECAY_SHAPES)
def test_wsd_shape_decay_shapes(shape):
    assert wsd_shape(0.8, 0.1, 0.2, shape) == 1.0
    mid = wsd_shape(0.9, 0.1, 0.2, shape, floor=0.1)
    assert mid == approx(0.1 + 0.9 * (0.5 if shape == "linear" else 1 - math.sqrt(0.5)))
    assert wsd_shape(1.0, 0.1, 0.2, shape, floor=0.1) == approx(0.1)
    assert wsd_shape(0.3, 0.0, 0.0, shape) == 1.0  # no warmup, no decay


def test_lr_cosine_boundaries():
    kw = dict(warmup=0.1, min_ratio=0.2)
    assert lr_multiplier(0.0, "cosine", **kw) == 0.0
    assert lr_multiplier(0.05, "cosine", **kw) == approx(0.5)
    assert lr_multiplier(0.1, "cosine", **kw) == approx(1.0)
    assert lr_multiplier(0.55, "cosine", **kw) == approx(0.6)  # halfway through the cosine
    assert lr_multiplier(1.0, "cosine", **kw) == approx(0.2)
    assert lr_multiplier(1.0, "cosine") == approx(0.1)  # documented default floor
    assert lr_multiplier(0.01, "cosine") == approx(1.0)  # documented default warmup 1%


def test_lr_wsd_boundaries():
    kw = dict(warmup=0.1, decay=0.2, decay_shape="linear")
    vals = [lr_multiplier(t, "wsd", **kw) for t in (0.0, 0.05, 0.1, 0.5, 0.8, 0.9, 1.0)]
    assert vals == approx([0.0, 0.5, 1.0, 1.0, 1.0, 0.5, 0.0])
    assert lr_multiplier(0.95, "wsd") == approx(1 - math.sqrt(0.5))  # default: 10% decay, 1-sqrt, to 0
    assert lr_multiplier(0.9, "wsd") == 1.0 and lr_multiplier(1.0, "wsd") == 0.0
    assert lr_multiplier(0.4, "constant") == 1.0


@settings(max_examples=200, deadline=None, derandomize=True)
@given(t=st.floats(-0.5, 1.5), name=st.sampled_from(ALPHA_SCHEDULES), a=st.floats(0, 1),
       lr=st.sampled_from(LR_SCHEDULES), shape=st.sampled_from(DECAY_SHAPES))
def test_schedules_stay_in_range(t, name, a, lr, shape):
    v = alpha_at(t, name, a, decay_shape=shape)
    lo = 1.0 - DEFAULT_WSD_BETA_PEAK if name == "wsd_beta" else 0.0
    hi = 1.0 if name == "wsd_beta" else a
    assert lo - 1e-12 <= v <= hi + 1e-12
    assert 0.0 <= lr_multiplier(t, lr, decay_shape=shape) <= 1.0


@settings(max_examples=100, deadline=None, derandomize=True)
@given(warmup=st.floats(0.01, 0.4), decay=st.floats(0.01, 0.5), shape=st.sampled_from(DECAY_SHAPES))
def test_wsd_is_monotone_in_each_phase(warmup, decay, shape):
    ts = [i / 200 for i in range(201)]
    v = [wsd_shape(t, warmup, decay, shape) for t in ts]
    stable_end = 1 - decay
    for a, b, t in zip(v, v[1:], ts[1:]):
        if t <= warmup:
            assert b >= a
        elif t <= stable_end:
            assert b == 1.0
        else:
            assert b <= a


def test_lambda_lr_follows_the_multiplier():
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=2.0)
    sched = lambda_lr(opt, "wsd", 100, warmup=0.1, decay=0.2, decay_shape="linear")
    lrs = []
    for _ in range(100):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == 0.0 and lrs[5] == approx(1.0) and lrs[10] == approx(2.0) and lrs[80] == approx(2.0)
    assert lrs[90] == approx(1.0) and lrs[99] == approx(0.1)


def test_make_alpha_schedule_validates_up_front():
    f = make_alpha_schedule("linear_dec", 0.5)
    assert f(0.0) == 0.5 and f(1.0) == 0.0
    with pytest.raises(ConfigError):
        make_alpha_schedule("wsd_alpha", 0.5, warmup=0.6, decay=0.6)


def test_table5_rows_are_complete_and_valid():
    printed = ["0-α+WSD-LR", "LLM-NLL", "LLM-KLD", "LLM-MSE", "Linear Inc", "Linear Dec", "Period", "1-α+WSD-LR",
               "WSD-α+Cos-LR", "WSD-β+WSD-LR", "WSD-α+WSD-LR"]
    assert set(printed) <= set(TABLE5_ROWS)
    for s in TABLE5_ROWS.values():
        assert s.loss_kind in LOSS_KINDS and s.alpha_schedule in ALPHA_SCHEDULES and s.lr_schedule in LR_SCHEDULES
    assert table5_row("WSD-α + WSD-LR") == TABLE5_ROWS["WSD-α+WSD-LR"]
    assert table5_row("wsd-alpha+wsd-lr").alpha_schedule == "wsd_alpha"
    assert table5_row("WSD-β + WSD-LR").alpha_schedule == "wsd_beta"
    assert table5_row("NLL").loss_kind == "nll" and table5_row("KLD").loss_kind == "kld"
    assert table5_row("MSE").loss_kind == "mse"
    assert table5_row("Linear Inc α").alpha_schedule == "linear_inc"
    assert table5_row("Period α").alpha_schedule == "period"
    assert table5_row("0-α+WSD-LR").alpha == 0.0 and table5_row("1-α+WSD-LR").alpha == 1.0
    assert table5_row("WSD-α+Cos-LR").lr_schedule == "cosine"


@pytest.mark.parametrize(("call", "needle"), [
    (lambda: alpha_at(0.5, "linear_ink"), "did you mean 'linear_inc'"),
    (lambda: alpha_at(0.5, "wsd_alfa"), "did you mean 'wsd_alpha'"),
    (lambda: lr_multiplier(0.5, "cosin"), "did you mean 'cosine'"),
    (lambda: lr_multiplier(0.5, "wsd", decay_shape="1-sqr"), "did you mean '1-sqrt'"),
    (lambda: table5_row("WSD-α+WSD-RL"), "did you mean 'WSD-α+WSD-LR'"),
    (lambda: alpha_at(0.5, "constant", 1.2), "loss.alpha=1.2"),
    (lambda: lr_multiplier(0.5, "wsd", warmup=0.7, decay=0.5), "warmup+decay"),
    (lambda: alpha_at(0.5, "period", periods=0), "loss.alpha_periods=0"),
    (lambda: alpha_at(0.5, "constant", 1.0, peak=0.5), "loss.wsd_peak=0.5 is not used by"),
    (lambda: alpha_at(0.5, "wsd_beta", 1.0, peak=1.5), "loss.wsd_peak=1.5"),
    (lambda: lambda_lr(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0), "wsd", 0), "max_steps=0"),
])
def test_bad_values_raise_config_error(call, needle):
    with pytest.raises(ConfigError, match=re.escape(needle)) as e:
        call()
    assert "\n" not in str(e.value)
