"""The paper's figures (and a few of our own) from runs, with matplotlib's Agg canvas.

Every function returns a `matplotlib.figure.Figure` and, given `out`, writes `out` as both PNG and
SVG (`out` is a path stem; a .png/.svg suffix is replaced). Figures are built on a `Figure` with
an Agg canvas rather than through pyplot, so they neither need a display nor change the caller's
backend (notebooks keep theirs) and nothing accumulates in pyplot's global figure list.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from analysis.tables import (AVERAGE, AVERAGE_CI, DELTA, DELTA_CI, DELTA_SIG, config_labels, is_finite, run_averages,
                             size_value, summarize)
from pd_lightning.errors import ConfigError

DELTA_LABEL = "Δ vs LM-only baseline (%)"
PARAM_NAMES = {"alpha": "α", "pd.alpha": "α", "tau": "τ", "pd.tau": "τ", "p": "p (top-p)", "pd.p": "p (top-p)",
               "k": "k (top-k)", "pd.k": "k (top-k)", "pd.label": "configuration", "pd.student": "student",
               "pd.teacher": "teacher", "pd.sampling": "targets",
               "store.target_bytes_per_token": "bytes / token of the targets' store"}
TARGET_BYTES = "store.target_bytes_per_token"  # train.target_storage: what a store of a run's own targets takes
STORE_COLUMNS = {"store.entries_per_token": "entries / token", "store.bytes_per_token": "bytes / token"}


# One marker per series, so series drawn on the same points stay distinguishable (with `_Dodge`).
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "<", ">", "h")


def _marker(i: int) -> str:
    return MARKERS[i % len(MARKERS)]


class _Dodge:
    """Small horizontal offsets for points that would land exactly on a point already drawn (two series
    with equal values, e.g. nll and kld with a fixed teacher): the k-th series at a point moves k steps
    right, multiplicatively on a log axis (`step` decades), else by `step` of the x span. Points that
    coincide with nothing keep their exact x."""

    def __init__(self, *, log: bool = False, span: float = 1.0, step: float | None = None):
        self.log = log
        self.step = step if step is not None else (0.012 if log else 0.02 * (span if span > 0 else 1.0))
        self.seen: dict[tuple[float, float], int] = {}

    @staticmethod
    def _key(x: float, y: float) -> tuple[float, float]:
        return (float(f"{x:.9g}"), float(f"{y:.9g}"))

    def __call__(self, x, y) -> np.ndarray:
        x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
        out = x.copy()
        for i, (xi, yi) in enumerate(zip(x, y)):
            if not (np.isfinite(xi) and np.isfinite(yi)):
                continue
            key = self._key(xi, yi)
            k = self.seen.get(key, 0)
            self.seen[key] = k + 1
            if k:
                out[i] = xi * 10 ** (self.step * k) if self.log else xi + self.step * k
        return out


def _new_figure(width: float = 6.4, height: float = 4.0) -> Figure:
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig: Figure, out: str | Path | None) -> list[Path]:
    """Write `fig` as out.png (150 dpi) and out.svg; returns the paths (none when `out` is None)."""
    if out is None:
        return []
    stem = Path(out)
    if stem.suffix.lower() in (".png", ".svg"):
        stem = stem.with_suffix("")
    stem.parent.mkdir(parents=True, exist_ok=True)
    paths = [stem.with_name(stem.name + ".png"), stem.with_name(stem.name + ".svg")]
    fig.savefig(paths[0], dpi=150)
    fig.savefig(paths[1])
    return paths


def _numeric(values: pd.Series) -> pd.Series | None:
    """The values as floats when every non-missing one is a number, else None (categorical)."""
    v = values.dropna()
    if v.empty:
        return None
    num = pd.to_numeric(v.astype(str), errors="coerce") if not pd.api.types.is_numeric_dtype(v) else v.astype(float)
    return pd.to_numeric(values, errors="coerce").astype(float) if num.notna().all() else None


def _require_column(runs: pd.DataFrame, col: str, what: str) -> None:
    if col not in runs:
        raise ConfigError(f"{what}={col!r} is not a column of runs; expected a run column such as alpha, p, k, tau, "
                          "pd.label, pd.loss or param.<name>")


def _deltas(runs: pd.DataFrame, keep: Sequence[str], baseline: str | None, group_by: str | Sequence[str] | None,
            ) -> pd.DataFrame:
    """Non-baseline configurations that have a Δ, with the `keep` columns; refuses when there are none."""
    table = summarize(runs, baseline, group_by=group_by, keep=keep)
    table = table[~table["baseline"] & table[DELTA].notna()]
    if table.empty:
        raise ConfigError("no configuration has a Δ: the runs hold no baseline (tag pd.baseline=true) or only "
                          "baseline runs; pass baseline=<label> of the LM-only configuration")
    return table


def _yerr(ci: pd.Series) -> np.ndarray | None:
    """Error bar half-widths: None when no interval is known (single seeds), else NaN -> 0."""
    return None if ci.isna().all() else ci.fillna(0.0).to_numpy(dtype=float)


def _errorbar(ax, x, table: pd.DataFrame, **kw) -> None:
    """Δ points with their 95% intervals (none drawn where unknown); a star where Δ's CI excludes 0."""
    kw.setdefault("marker", "o")
    ax.errorbar(x, table[DELTA].to_numpy(), yerr=_yerr(table[DELTA_CI]), capsize=3, **kw)
    sig = table[DELTA_SIG].to_numpy(dtype=bool)
    if sig.any():
        ax.scatter(np.asarray(x)[sig], table[DELTA].to_numpy()[sig], marker="*", s=90, zorder=5, color="black")


def _zero_line(ax) -> None:
    ax.axhline(0.0, color="grey", linewidth=0.8, linestyle="--", zorder=0)


def fig_delta_vs_param(runs: pd.DataFrame, param: str, out: str | Path | None = None, *, baseline: str | None = None,
                       group_by: str | Sequence[str] | None = None, hue: str | None = None,
                       log_x: bool = False, title: str | None = None) -> Figure:
    """Δ (with 95% CI error bars) against any swept parameter: a line over a numeric parameter
    (alpha, p, k, tau, param.loss.alpha, ...), bars over a categorical one (pd.loss, pd.label, ...).
    `hue` draws one line / bar set per value of another column (e.g. p in Fig. 3)."""
    _require_column(runs, param, "param")
    if hue is not None:
        _require_column(runs, hue, "hue")
    table = _deltas(runs, [param] + ([hue] if hue else []), baseline, group_by)
    x_num = _numeric(table[param])
    fig = _new_figure()
    ax = fig.add_subplot()
    if hue is None and table["group"].nunique() > 1:
        hue = "group"  # e.g. one baseline per student size: one series per group, not overlapping bars
    series = [(None, table)] if hue is None else list(table.groupby(hue, sort=False, dropna=False))
    if x_num is not None:
        xs = x_num.dropna()
        dodge = _Dodge(log=log_x, span=float(xs.max() - xs.min()) if not xs.empty else 1.0)
        for i, (name, part) in enumerate(series):
            part = part.assign(_x=x_num.loc[part.index]).sort_values("_x")
            label = None if name is None else f"{PARAM_NAMES.get(hue, hue)} = {float(name):g}" if is_finite(name) else str(name)
            _errorbar(ax, dodge(part["_x"].to_numpy(), part[DELTA].to_numpy()), part, label=label, marker=_marker(i))
        if log_x:
            ax.set_xscale("log")
            ticks = sorted(set(x_num.dropna()))
            ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
            ax.minorticks_off()
    else:
        cats = list(dict.fromkeys(table[param].astype(str)))
        width = 0.8 / len(series)
        for i, (name, part) in enumerate(series):
            pos = np.array([cats.index(str(v)) for v in part[param]]) + (i - (len(series) - 1) / 2) * width
            ax.bar(pos, part[DELTA].to_numpy(), width=width, yerr=_yerr(part[DELTA_CI]), capsize=3,
                   label=None if name is None else str(name))
        ax.set_xticks(range(len(cats)), cats, rotation=30 if len(cats) > 4 else 0, ha="right" if len(cats) > 4 else "center")
    _zero_line(ax)
    ax.set_xlabel(PARAM_NAMES.get(param, param))
    ax.set_ylabel(DELTA_LABEL)
    ax.set_title(title or ("Δ per configuration" if param == "pd.label" else f"Δ vs {PARAM_NAMES.get(param, param)}"))
    if hue is not None:
        ax.legend()
    save_figure(fig, out)
    return fig


def _kd_runs(runs: pd.DataFrame) -> pd.Series:
    """True for runs that are not baseline (LM-only) runs."""
    if "pd.baseline" in runs:
        return ~runs["pd.baseline"].astype(str).str.lower().eq("true")
    return pd.Series(True, index=runs.index)


def fig_delta_vs_p(runs: pd.DataFrame, out: str | Path | None = None, *, baseline: str | None = None,
                   k: float | None = None) -> Figure:
    """Fig. 2: Δ vs p of top-p-k at fixed k (default: the largest k swept, the paper's k = 100); with
    the store's entries/token and bytes/token on a second y axis when the runs carry the
    `store.entries_per_token` / `store.bytes_per_token` columns."""
    _require_column(runs, "p", "param")
    kd = _kd_runs(runs)
    k = float(runs.loc[kd, "k"].max()) if k is None and "k" in runs and runs.loc[kd, "k"].notna().any() else k
    keep_run = ~kd | (runs["k"] == k) if k is not None else pd.Series(True, index=runs.index)
    sel = runs[keep_run]
    store_cols = [c for c in STORE_COLUMNS if c in sel and sel[c].notna().any()]
    table = _deltas(sel, ["p", *store_cols], baseline, None).sort_values("p")
    fig = _new_figure()
    ax = fig.add_subplot()
    _errorbar(ax, table["p"].to_numpy(), table, label="Δ", color="C0")
    _zero_line(ax)
    ax.set_xlabel("p (top-p-k, k = %g)" % k if k is not None else "p (top-p)")
    ax.set_ylabel(DELTA_LABEL)
    ax.set_title("Δ vs p" + (f" (top-p-{k:g})" if k is not None else ""))
    if store_cols:
        ax2 = ax.twinx()
        for i, col in enumerate(store_cols):
            ax2.plot(table["p"], table[col], color=f"C{i + 1}", marker="s", linestyle=":", label=STORE_COLUMNS[col])
        ax2.set_ylabel("store size per token")
        lines = ax.get_legend_handles_labels()[0] + ax2.get_legend_handles_labels()[0]
        ax.legend(lines, [h.get_label() for h in lines], loc="best")
    save_figure(fig, out)
    return fig


def fig_delta_vs_k(runs: pd.DataFrame, out: str | Path | None = None, *, baseline: str | None = None) -> Figure:
    """Fig. 3: Δ vs k of top-p-k, one line per p that was swept over several k (e.g. top-0.95-k and
    top-1.0-k); k on a log axis."""
    _require_column(runs, "k", "param")
    _require_column(runs, "p", "hue")
    kd = _kd_runs(runs)
    k_per_p = runs[kd].groupby("p")["k"].nunique()
    ps = list(k_per_p[k_per_p > 1].index) or list(k_per_p.index)  # a p with one k is a point, not a line
    sel = runs[~kd | runs["p"].isin(ps)]
    return fig_delta_vs_param(sel, "k", out, baseline=baseline, hue="p", log_x=True, title="Δ vs k (top-p-k)")


def has_target_families(runs: pd.DataFrame) -> bool:
    """Whether the runs compare top-p-k and sampled targets (both families, with their target bytes logged)."""
    if TARGET_BYTES not in runs or "pd.sampling" not in runs:
        return False
    kd = _kd_runs(runs) & runs[TARGET_BYTES].notna()
    return set(runs.loc[kd, "pd.sampling"].astype(str)) >= {"topk", "sample"}


def fig_delta_vs_bytes(runs: pd.DataFrame, out: str | Path | None = None, *, baseline: str | None = None,
                       group_by: str | Sequence[str] | None = None) -> Figure:
    """Δ against the bytes per token each configuration's targets need (`store.target_bytes_per_token`: its
    own top-p-k re-encoded, or the sampled store), one series per target family (`pd.sampling`: topk, sample),
    log x axis: sampled vs top-p-k targets at equal storage (issue: sampled_vs_topk.yaml)."""
    _require_column(runs, TARGET_BYTES, "param")
    _require_column(runs, "pd.sampling", "hue")
    return fig_delta_vs_param(runs, TARGET_BYTES, out, baseline=baseline, group_by=group_by, hue="pd.sampling",
                              log_x=True, title="Δ vs bytes per token: top-p-k and sampled targets")


def _size_order(values: Sequence[object]) -> list[str]:
    """Distinct values sorted by the model size they name (unparseable ones last, in order)."""
    uniq = list(dict.fromkeys(str(v) for v in values))
    return sorted(uniq, key=lambda v: (size_value(v) is None, size_value(v) or 0.0))


def fig_delta_vs_student(runs: pd.DataFrame, out: str | Path | None = None, *, baseline: str | None = None,
                         group_by: str | Sequence[str] | None = None) -> Figure:
    """Fig. 4: Δ vs student size, one line per teacher; each size is measured against its own LM
    baseline (groups: the pd.group tag when set, else pd.student)."""
    _require_column(runs, "pd.student", "column")
    if group_by is None and not ("pd.group" in runs and runs["pd.group"].fillna("").astype(str).ne("").any()):
        group_by = "pd.student"
    keep = ["pd.student"] + (["pd.teacher"] if "pd.teacher" in runs else [])
    table = _deltas(runs, keep, baseline, group_by)
    sizes = _size_order(table["pd.student"])
    fig = _new_figure()
    ax = fig.add_subplot()
    teachers = _size_order(table["pd.teacher"]) if "pd.teacher" in table else [""]
    dodge = _Dodge(step=0.04)  # sizes sit at 0, 1, 2, ...
    for i, teacher in enumerate(teachers):
        part = table[table["pd.teacher"].astype(str) == teacher] if teacher else table
        part = part.assign(_x=[sizes.index(str(s)) for s in part["pd.student"]]).sort_values("_x")
        _errorbar(ax, dodge(part["_x"].to_numpy(), part[DELTA].to_numpy()), part,
                  label=f"teacher {teacher}" if teacher else None, marker=_marker(i))
    ax.set_xticks(range(len(sizes)), sizes)
    _zero_line(ax)
    ax.set_xlabel("student")
    ax.set_ylabel(DELTA_LABEL)
    ax.set_title("Δ vs student size")
    if "pd.teacher" in table:
        ax.legend()
    save_figure(fig, out)
    return fig


def fig_sizes(runs: pd.DataFrame, out: str | Path | None = None, *, series: Sequence[str] | dict[str, str] | None = None,
              best: bool = False, baseline: str | None = None) -> Figure:
    """Fig. 1: Average per student size, grouped bars: the LM-only baseline, each configuration in
    `series` (labels, or {label: legend name}; default: every label) and, with `best=True`, the
    best non-baseline configuration of each size ("best PD"). Error bars: 95% CI over seeds."""
    _require_column(runs, "pd.student", "column")
    table = summarize(runs, baseline, group_by="pd.student", keep=["pd.student"])
    labels = list(dict.fromkeys(table["label"]))
    names = dict(series) if isinstance(series, dict) else {lab: lab for lab in (series or labels)}
    for lab in names:
        if lab not in labels:
            raise ConfigError(f"series: {lab!r} is not a configuration label of these runs; expected one of {', '.join(labels)}")
    sizes = _size_order(table["pd.student"])
    bars: list[tuple[str, pd.DataFrame]] = [(name, table[table["label"] == lab]) for lab, name in names.items()]
    if best:
        kd = table[~table["baseline"] & table[AVERAGE].notna()]
        if not kd.empty:
            bars.append(("best PD", kd.loc[kd.groupby("pd.student")[AVERAGE].idxmax()]))
    fig = _new_figure(max(6.4, 1.6 * len(sizes) + 2), 4.0)
    ax = fig.add_subplot()
    width = 0.8 / max(len(bars), 1)
    for i, (name, part) in enumerate(bars):
        pos = np.array([sizes.index(str(s)) for s in part["pd.student"]]) + (i - (len(bars) - 1) / 2) * width
        ax.bar(pos, part[AVERAGE].to_numpy(), width=width, yerr=_yerr(part[AVERAGE_CI]), capsize=3, label=name)
    ax.set_xticks(range(len(sizes)), sizes)
    ax.set_xlabel("student")
    ax.set_ylabel("Average (%)")
    ax.set_title("Average by student size")
    ax.legend()
    save_figure(fig, out)
    return fig


def fig_checkpoints(curves: pd.DataFrame, out: str | Path | None = None, *, ylabel: str = "Average (%)") -> Figure:
    """Fig. 5: score vs consumed tokens (billions), one line per label (e.g. 1.9B LM vs 1.9B KD).
    `curves`: columns label, tokens, value (from `analysis.checkpoint_curves`); steps are used on
    the x axis when tokens are unknown."""
    missing = {"label", "value"} - set(curves.columns)
    if missing or not ({"tokens", "step"} & set(curves.columns)):
        raise ConfigError("curves must have columns label, tokens (or step) and value; see analysis.checkpoint_curves")
    if curves.empty:
        raise ConfigError("curves is empty: no run logged the metric at checkpoints")
    use_tokens = "tokens" in curves and curves["tokens"].notna().all()
    x_col, scale = ("tokens", 1e9) if use_tokens else ("step", 1.0)
    fig = _new_figure()
    ax = fig.add_subplot()
    for label, part in curves.groupby("label", sort=False):
        part = part.sort_values(x_col)
        ax.plot(part[x_col] / scale, part["value"], marker="o", label=str(label))
    ax.set_xlabel("consumed tokens (B)" if use_tokens else "step")
    ax.set_ylabel(ylabel)
    ax.set_title("Checkpoints")
    ax.legend()
    save_figure(fig, out)
    return fig


def reliability_table(bins: pd.DataFrame) -> pd.DataFrame:
    """Per configuration (label) and bin index: the mean over its runs (seeds) of confidence and accuracy,
    and the mean ECE: columns label, bin, conf, acc, ece. Equal-mass bins of runs on the same held-out
    tokens hold the same number of tokens each, so bin b is the same confidence quantile in every run."""
    missing = {"label", "bin", "conf", "acc", "ece"} - set(bins.columns)
    if missing:
        raise ConfigError(f"bins lacks columns {', '.join(sorted(missing))}; see analysis.reliability_bins")
    if bins.empty:
        raise ConfigError("bins is empty: no run has held-out reliability bins (eval/heldout.json)")
    per_bin = bins.groupby(["label", "bin"], sort=False)[["conf", "acc"]].mean().reset_index()
    ece = bins.drop_duplicates(["label", "run_id"] if "run_id" in bins else ["label"]).groupby("label", sort=False)["ece"].mean()
    return per_bin.assign(ece=per_bin["label"].map(ece))


def fig_reliability(bins: pd.DataFrame, out: str | Path | None = None, *, columns: int = 3) -> Figure:
    """Reliability diagram per configuration: accuracy against mean top-1 confidence of each equal-mass
    bin of the held-out next-token predictions (means over seeds; `reliability_table`), the diagonal
    being perfect calibration; the panel title gives the configuration's ECE. `bins`: from
    `analysis.reliability_bins`; panels follow the order labels first appear in."""
    table = reliability_table(bins)
    labels = list(dict.fromkeys(table["label"]))
    cols = max(1, min(columns, len(labels)))
    rows = -(-len(labels) // cols)
    fig = _new_figure(3.0 * cols + 0.4, 3.0 * rows + 0.3)
    axes = fig.subplots(rows, cols, squeeze=False, sharex=True, sharey=True)
    for ax in axes.flat[len(labels):]:
        ax.set_visible(False)
    for ax, label in zip(axes.flat, labels):
        part = table[table["label"] == label].sort_values("bin")
        ax.plot([0, 1], [0, 1], color="grey", linewidth=0.8, linestyle="--")
        ax.plot(part["conf"], part["acc"], marker="o", markersize=3)
        ax.set_title(f"{label}\nECE {part['ece'].iloc[0]:.4f}", fontsize=9)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
    for i, label in enumerate(labels):  # the lowest panel of each column carries the x axis
        if i + cols >= len(labels):
            ax = axes.flat[i]
            ax.xaxis.set_tick_params(labelbottom=True)
            ax.set_xlabel("top-1 confidence")
    for ax in axes[:, 0]:
        ax.set_ylabel("accuracy")
    save_figure(fig, out)
    return fig


def has_cost(runs: pd.DataFrame) -> bool:
    """Whether the runs carry total compute (cost.total_flops), which `fig_compute` needs."""
    return "cost.total_flops" in runs and runs["cost.total_flops"].notna().any()


def fig_compute(runs: pd.DataFrame, out: str | Path | None = None, *, tasks: Sequence[str] | None = None) -> Figure | None:
    """Average against total compute (cost.total_flops, log x) for every run; LM-only runs drawn as
    the reference curve, so PD above the curve beats simply training longer (iso-compute). Each
    configuration has its own marker, and one lying exactly on another's points is dodged a little right.
    Returns None and writes nothing when the runs carry no cost metrics."""
    if not has_cost(runs):
        return None
    runs = runs[runs["cost.total_flops"].notna()]  # tasks are then those every costed run was scored on
    per_run = pd.DataFrame({"flops": pd.to_numeric(runs["cost.total_flops"], errors="coerce"),
                            AVERAGE: run_averages(runs, tasks), "label": config_labels(runs), "lm": _is_lm(runs)})
    per_run = per_run[per_run["flops"].notna() & per_run[AVERAGE].notna()]
    fig = _new_figure()
    ax = fig.add_subplot()
    lm = per_run[per_run["lm"]].sort_values("flops")
    dodge = _Dodge(log=True)  # a series on exactly another's points is drawn a little to its right
    if not lm.empty:
        dodge(lm["flops"] / 1e15, lm[AVERAGE])
        ax.plot(lm["flops"] / 1e15, lm[AVERAGE], color="black", marker="o", label="LM only (reference)")
    kd = per_run[~per_run["lm"]]
    labels = list(dict.fromkeys(kd["label"]))
    for i, lab in enumerate(labels if len(labels) <= 10 else ["PD"]):
        part = kd if len(labels) > 10 else kd[kd["label"] == lab]
        ax.scatter(dodge(part["flops"] / 1e15, part[AVERAGE]), part[AVERAGE], color=f"C{i % 10}", label=lab,
                   marker=_marker(i + 1), alpha=0.85)
    ax.set_xscale("log")
    ax.set_xlabel("total compute (PFLOPs, teacher included)")
    ax.set_ylabel("Average (%)")
    ax.set_title("Average vs compute")
    ax.legend(fontsize="small")
    save_figure(fig, out)
    return fig


def _is_lm(runs: pd.DataFrame) -> pd.Series:
    """LM-only runs: pd.kind == lm, else the baseline tag."""
    if "pd.kind" in runs:
        return runs["pd.kind"].astype(str).eq("lm")
    if "pd.baseline" in runs:
        return runs["pd.baseline"].astype(str).str.lower().eq("true")
    return pd.Series(False, index=runs.index)
