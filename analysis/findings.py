"""`pdl findings`: every claim of `analysis.claims` re-tested on the sweeps' runs, written as docs/findings.md.

Two steps, so that anyone can check the report without re-running anything:

    export   MLflow store(s) -> results/<scale>/<sweep>/runs.csv (one row per finished child run: its
             design tags, eval metrics in table units, held-out metrics, cost), checkpoints.csv (the
             scores Table 12 logs at every checkpoint) and sweep.json (commit, seeds, trials, wall time)
    report   results/<scale>/ -> docs/findings.md + docs/findings/<claim>.png

The report is built from the exported files only, also when `pdl findings` reads MLflow, so the committed
results regenerate the committed report byte for byte (tests/test_findings.py).

Statistics. A contrast (analysis.claims) is a signed sum of configuration means; its per-seed value is
the same sum over the runs of one seed (every configuration of a sweep trains seed s from the same
initialisation and data order, so seeds pair), and its 95% interval is Student's t over the seeds
(n − 1 degrees of freedom). It is computed on the local-suite Average (points: the mean of the task
scores, in %) and on the held-out loss (nats/token; lower is better, so every test is mirrored).
A verdict compares the interval with what the claim expects:

    gt (A beats B)   replicated: the interval lies above 0; contradicted: below 0; else unresolved
    lt               the mirror image
    eq (A ≈ B)       replicated: the interval lies within ± margin; contradicted: it lies wholly beyond
                     the margin (above + margin or below − margin); else unresolved
    ge (≈ or better) replicated: the interval's low end is above − margin; contradicted: it lies wholly
                     below − margin; else unresolved
    le               the mirror image

(An interval that excludes 0 but reaches into the margin is unresolved: "about equal" is not ruled out.)

The margins (MARGINS) are stated in the report. A claim is replicated when all its contrasts are,
contradicted when any is, else unresolved.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from analysis.claims import CLAIMS, Claim, Contrast
from analysis.stats import t975
from analysis.tables import percent_task_columns, run_averages
from pd_lightning.errors import ConfigError

RUNS_FILE, CHECKPOINTS_FILE, SWEEP_FILE = "runs.csv", "checkpoints.csv", "sweep.json"
FIGURE_DIR = "findings"
# How far apart two configurations may be and still count as "about equal" (eq / ge / le tests).
MARGINS = {"average": 2.0, "loss": 0.01}
METRIC_NAMES = {"average": "Average (points)", "loss": "held-out loss (nats/token)"}
HELDOUT = {"loss": "eval.heldout.loss", "ece": "eval.heldout.ece"}
MIRROR = {"gt": "lt", "lt": "gt", "eq": "eq", "ge": "le", "le": "ge"}
TEST_WORDS = {"gt": "> 0", "lt": "< 0", "eq": "≈ 0", "ge": "≥ 0 (≈ or better)", "le": "≤ 0 (≈ or worse)"}
# Columns of runs.csv beside the pd.* tags and the metrics: what a row needs to be read without MLflow.
_KEEP_PARAMS = ("param.data.train_tokens", "param.trainer.max_steps", "param.trainer.batch_size", "param.eval.limit",
                "param.model.preset", "param.teacher.preset")
_DROP_PREFIXES = ("param.", "train/", "val/", "lr", "alpha/", "epoch")


# ----------------------------------------------------------------------------------------------- export


def _sweep_parents(client, sweep: str) -> list:
    from mlflow.entities import ViewType

    runs = []
    for exp in client.search_experiments(view_type=ViewType.ACTIVE_ONLY):
        runs += client.search_runs([exp.experiment_id], filter_string=f"tags.`pd.sweep` = '{sweep}' and "
                                   "tags.`pd.role` = 'sweep'")
    return runs


def export_sweep(tracking_uri: str, sweep: str, out_dir: str | Path, *, scale: str = "tiny") -> Path | None:
    """Write `out_dir/<sweep>/` from the store's finished runs of `sweep` at `scale`; None if it has none or
    is still running (its parent run is RUNNING: a partial sweep would publish a table with rows missing)."""
    from mlflow.tracking import MlflowClient

    from analysis.runs import load_runs, metric_history

    client = MlflowClient(tracking_uri=tracking_uri)
    parents = [p for p in _sweep_parents(client, sweep) if p.data.tags.get("pd.scale") == scale]
    if parents and all(p.info.status == "RUNNING" for p in parents):
        return None  # still running: its runs are exported once it has finished
    runs = load_runs(tracking_uri, sweep=sweep)
    if "pd.scale" in runs:
        runs = runs[runs["pd.scale"] == scale]
    if runs.empty:
        return None
    folder = Path(out_dir) / sweep
    folder.mkdir(parents=True, exist_ok=True)
    keep = [c for c in runs.columns if not c.startswith(_DROP_PREFIXES) or c in _KEEP_PARAMS]
    table = runs[keep]  # in the order the runs were made (load_runs): the tables list rows in that order
    table.to_csv(folder / RUNS_FILE, index=False, float_format="%.10g")
    curves = []
    for run_id in table["run_id"]:
        run = client.get_run(run_id)
        for key in sorted(k for k in run.data.metrics if k.startswith("eval.")):
            hist = metric_history(tracking_uri, run_id, key)  # accuracy-like scores already in percent
            if len(hist) > 1:  # scored at several checkpoints (Table 12)
                curves += [(run_id, key, int(s), float(v)) for s, v in zip(hist["step"], hist["value"])]
    if curves:
        pd.DataFrame(curves, columns=["run_id", "key", "step", "value"]).to_csv(
            folder / CHECKPOINTS_FILE, index=False, float_format="%.10g")
    reused = int(table["pd.reused_from"].notna().sum()) if "pd.reused_from" in table else 0
    trained = table[table["pd.reused_from"].isna()] if "pd.reused_from" in table else table
    meta = {
        "sweep": sweep, "scale": scale, "runs": len(table),
        "configurations": int(table.groupby(["pd.group", "pd.label"] if "pd.group" in table else ["pd.label"],
                                            dropna=False).ngroups),
        "seeds": sorted(int(s) for s in pd.to_numeric(table["pd.seed"]).dropna().unique()),
        "reused_runs": reused,
        "trained_runs": len(trained),
        "trial_wall_hours": round(float(pd.to_numeric(trained.get("cost.wall_seconds"), errors="coerce").sum()) / 3600, 2)
        if "cost.wall_seconds" in trained else None,
        "sweep_wall_hours": _parent_hours(parents),
        "commits": sorted({p.data.tags.get("mlflow.source.git.commit", "unknown") for p in parents}) or ["unknown"],
    }
    (folder / SWEEP_FILE).write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n")
    return folder


def _parent_hours(parents: list) -> float | None:
    spans = [(p.info.end_time - p.info.start_time) / 3.6e6 for p in parents if p.info.end_time and p.info.start_time]
    return round(sum(spans), 2) if spans else None


def export_all(tracking_uris: list[str], out_dir: str | Path, *, scale: str = "tiny") -> list[str]:
    """Export every claim's sweep found in any of the stores (the first store that has it); returns their names."""
    done = []
    for sweep in dict.fromkeys(c.sweep for c in CLAIMS):
        for uri in tracking_uris:
            if export_sweep(uri, sweep, out_dir, scale=scale) is not None:
                done.append(sweep)
                break
    return done


# ------------------------------------------------------------------------------------------------- load


def load_results(results_dir: str | Path) -> dict[str, dict[str, Any]]:
    """{sweep: {"runs": DataFrame, "checkpoints": DataFrame | None, "meta": dict}} for every exported sweep."""
    root = Path(results_dir)
    if not root.is_dir():
        raise ConfigError(f"--runs={str(root)!r} is not a directory; expected a results dir such as results/tiny "
                          "(written by `pdl findings --tracking-uri URI`)")
    out = {}
    for folder in sorted(p for p in root.iterdir() if (p / RUNS_FILE).is_file()):
        runs = pd.read_csv(folder / RUNS_FILE, dtype={c: str for c in _tag_columns(folder / RUNS_FILE)},
                           keep_default_na=True)
        ckpt = folder / CHECKPOINTS_FILE
        meta = folder / SWEEP_FILE
        out[folder.name] = {"runs": runs, "checkpoints": pd.read_csv(ckpt) if ckpt.is_file() else None,
                            "meta": json.loads(meta.read_text()) if meta.is_file() else {}}
    return out


def _tag_columns(path: Path) -> list[str]:
    header = path.read_text().split("\n", 1)[0].split(",")
    return [c for c in header if c.startswith("pd.") or c in ("run_id", "run_name", "status", "parent_run_id")]


# ---------------------------------------------------------------------------------------------- contrasts


@dataclass(frozen=True)
class Estimate:
    """A contrast on one metric: mean over paired seeds, 95% half-width, seeds, and the test's verdict."""

    mean: float
    ci95: float
    n: int
    verdict: str

    @property
    def low(self) -> float:
        return self.mean - self.ci95

    @property
    def high(self) -> float:
        return self.mean + self.ci95


def verdict(mean: float, ci95: float, test: str, margin: float) -> str:
    """replicated | contradicted | unresolved for an interval mean ± ci95 against `test` (module doc)."""
    if not (math.isfinite(mean) and math.isfinite(ci95)):
        return "unresolved"
    low, high = mean - ci95, mean + ci95
    if test == "gt":
        return "replicated" if low > 0 else "contradicted" if high < 0 else "unresolved"
    if test == "lt":
        return "replicated" if high < 0 else "contradicted" if low > 0 else "unresolved"
    if test == "eq":
        if -margin <= low and high <= margin:
            return "replicated"
        return "contradicted" if (low > margin or high < -margin) else "unresolved"
    if test == "ge":
        return "replicated" if low >= -margin else "contradicted" if high < -margin else "unresolved"
    if test == "le":
        return "replicated" if high <= margin else "contradicted" if low > margin else "unresolved"
    raise ConfigError(f"test={test!r} is not allowed; expected one of gt, lt, eq, ge, le")


def per_run_values(runs: pd.DataFrame) -> pd.DataFrame:
    """label, group, seed, average (`run_averages`: the tables' Average, %), loss, ece: one row per run."""
    out = pd.DataFrame({
        "label": runs["pd.label"].astype(str),
        "group": runs["pd.group"].fillna("").astype(str) if "pd.group" in runs else "",
        "seed": pd.to_numeric(runs["pd.seed"]).astype(int),
        "average": run_averages(runs) if percent_task_columns(runs) else np.nan,
    })
    for name, col in HELDOUT.items():
        out[name] = pd.to_numeric(runs[col], errors="coerce") if col in runs else np.nan
    return out


def at_step(runs: pd.DataFrame, checkpoints: pd.DataFrame | None, step: int) -> pd.DataFrame:
    """The runs as they scored at checkpoint `step` (their metrics replaced by those logged at that step).

    The held-out metrics are measured once, at the end of training: a run keeps them at its last checkpoint
    only (earlier checkpoints have none, and their held-out contrasts read "not run")."""
    if checkpoints is None:
        return runs.iloc[0:0]
    here = checkpoints[checkpoints["step"] == step].pivot_table(index="run_id", columns="key", values="value",
                                                               aggfunc="last")
    last = checkpoints.groupby("run_id")["step"].max()
    tags = runs[[c for c in runs.columns if c.startswith("pd.") or c == "run_id" or c in HELDOUT.values()]].copy()
    for col in set(HELDOUT.values()) & set(tags.columns):
        tags.loc[tags["run_id"].map(last).ne(step), col] = np.nan
    return tags.merge(here, left_on="run_id", right_index=True, how="inner")


def estimate(values: pd.DataFrame, contrast: Contrast, metric: str, test: str) -> Estimate:
    """The contrast's per-seed values on `metric`, their mean, t half-width and verdict."""
    per_seed = None
    for term in contrast.terms:
        rows = values[(values["label"] == term.label) & (values["group"] == term.group)]
        series = rows.groupby("seed")[metric].mean() * term.weight
        per_seed = series if per_seed is None else per_seed.add(series, fill_value=np.nan)
    v = per_seed.dropna().to_numpy(dtype=float) if per_seed is not None else np.array([])
    if v.size == 0:
        return Estimate(math.nan, math.nan, 0, "not run")
    mean = float(v.mean())
    ci = t975(v.size - 1) * float(v.std(ddof=1)) / math.sqrt(v.size) if v.size > 1 else math.nan
    if v.size > 1 and float(v.std(ddof=1)) == 0.0:
        ci = 0.0  # identical by construction (NLL vs KLD): the interval is the point
    return Estimate(mean, ci, int(v.size), verdict(mean, ci, test, MARGINS.get(metric, 0.0)))


def combine(verdicts: list[str]) -> str:
    """A claim's verdict from its contrasts' (module doc)."""
    if not verdicts or all(v == "not run" for v in verdicts):
        return "not run"
    if "contradicted" in verdicts:
        return "contradicted"
    if all(v == "replicated" for v in verdicts):
        return "replicated"
    return "unresolved"


@dataclass
class ClaimResult:
    claim: Claim
    rows: list[dict[str, Any]]
    average: str
    loss: str
    storage: list[tuple[str, float]]


def evaluate_claim(claim: Claim, sweep: dict[str, Any] | None) -> ClaimResult:
    """Every contrast of `claim` on its sweep's runs (Average and held-out loss), with the claim's verdicts."""
    rows = []
    for c in claim.contrasts:
        if sweep is None:
            avg = loss = Estimate(math.nan, math.nan, 0, "not run")
            ece = math.nan
        else:
            runs = sweep["runs"] if c.step is None else at_step(sweep["runs"], sweep["checkpoints"], c.step)
            values = per_run_values(runs) if len(runs) else per_run_values(sweep["runs"]).iloc[0:0]
            avg = estimate(values, c, "average", c.test)
            loss = estimate(values, c, "loss", MIRROR[c.test])
            ece = estimate(values, c, "ece", c.test).mean
        rows.append({"contrast": c, "average": avg, "loss": loss, "ece": ece})
    storage = _storage(sweep["runs"]) if claim.storage and sweep is not None else []
    extra = [storage_verdict(storage)] if claim.key == "C7" and storage else []  # "storage falls steeply"
    return ClaimResult(claim, rows, combine([r["average"].verdict for r in rows] + extra),
                       combine([r["loss"].verdict for r in rows] + extra), storage)


STEEP = 3.0  # "storage falls steeply": the narrowest top-0.95-k takes at most 1/STEEP of top-0.95-100's bytes


def storage_verdict(storage: list[tuple[str, float]]) -> str:
    """C7's storage half, measured (no seeds involved): bytes per token rise with k at p = 0.95 and with p at
    k = 100, and top-0.95-100 takes at least STEEP times the narrowest top-0.95-k's bytes."""
    cuts = {}
    for label, value in storage:
        parts = label.split("-")
        if len(parts) == 3 and parts[0] == "top":
            cuts[(float(parts[1]), int(parts[2]))] = value
    by_k = [cuts[key] for key in sorted(key for key in cuts if key[0] == 0.95)]
    by_p = [cuts[key] for key in sorted(key for key in cuts if key[1] == 100)]
    if len(by_k) < 2 or (0.95, 100) not in cuts:
        return "unresolved"
    monotone = all(a <= b for a, b in zip(by_k, by_k[1:])) and all(a <= b for a, b in zip(by_p, by_p[1:]))
    steep = cuts[(0.95, 100)] >= STEEP * by_k[0]
    return "replicated" if monotone and steep else "contradicted"


def _storage(runs: pd.DataFrame) -> list[tuple[str, float]]:
    """(label, mean bytes per token of the run's own targets) for every distilled configuration, in row order."""
    col = "store.target_bytes_per_token"
    if col not in runs:
        return []
    kd = runs[pd.to_numeric(runs[col], errors="coerce").notna()]
    means = kd.groupby("pd.label", sort=False)[col].mean()
    return [(str(label), float(value)) for label, value in means.items()]


# ------------------------------------------------------------------------------------------------ figures


VERDICT_COLOURS = {"replicated": "#1b7837", "contradicted": "#b2182b", "unresolved": "#878787", "not run": "#cccccc"}


def figure(result: ClaimResult, out_stem: Path) -> Path | None:
    """A forest plot of the claim's contrasts: Average (left) and held-out loss (right), 95% intervals, the paper's
    value as a cross, coloured by verdict; None when nothing ran."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = [r for r in result.rows if r["average"].n]
    if not rows:
        return None
    fig = Figure(figsize=(11, 0.45 * len(rows) + 1.6))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2, sharey=True)
    y = np.arange(len(rows))[::-1]
    for ax, metric in zip(axes, ("average", "loss")):
        margin = MARGINS[metric]
        if any(r["contrast"].test in ("eq", "ge", "le") for r in rows):
            ax.axvspan(-margin, margin, color="#f0f0f0", zorder=0)
        ax.axvline(0, color="black", linewidth=0.8)
        for yi, r in zip(y, rows):
            est = r[metric]
            colour = VERDICT_COLOURS[est.verdict]
            err = est.ci95 if math.isfinite(est.ci95) else 0.0
            ax.errorbar(est.mean, yi, xerr=err, fmt="o", color=colour, capsize=3)
            if metric == "average" and r["contrast"].paper is not None:
                ax.plot(r["contrast"].paper, yi, "x", color="#2166ac")
        ax.set_xlabel(METRIC_NAMES[metric])
    axes[0].set_yticks(y, [r["contrast"].name for r in rows], fontsize=8)
    axes[0].set_title(f"{result.claim.key}: Average (x: the paper)", fontsize=9)
    axes[1].set_title("held-out loss (lower is better)", fontsize=9)
    fig.tight_layout()
    out_stem.parent.mkdir(parents=True, exist_ok=True)
    path = out_stem.with_suffix(".png")
    fig.savefig(path, dpi=110, metadata={"Software": None})
    return path


# ------------------------------------------------------------------------------------------------- render


def _num(x: float, digits: int = 1) -> str:
    return "–" if x is None or not math.isfinite(x) else f"{x:+.{digits}f}"


def _interval(est: Estimate, digits: int) -> str:
    if not est.n:
        return "not run"
    if not math.isfinite(est.ci95):
        return f"{_num(est.mean, digits)} (n = {est.n}, no interval)"
    return f"{_num(est.mean, digits)} ± {est.ci95:.{digits}f}"


def _same_row_note(sweeps: dict[str, dict[str, Any]]) -> str:
    """The Average of vanilla PD in table8 (re-cut store) and table1 (its own store), where both ran."""
    means = []
    for sweep, label in (("table8_top_p_k", "top-0.95-100"), ("table1_lm_vs_kd", "LLM-KD")):
        runs = sweeps.get(sweep, {}).get("runs")
        if runs is None:
            return ""
        values = per_run_values(runs)
        means.append(values.loc[values["label"] == label, "average"].mean())
    if not all(math.isfinite(m) for m in means):
        return ""
    return (f" ({means[0]:.1f} Average points) while `table1_lm_vs_kd`'s LLM-KD, the same configuration, reads a "
            f"top-0.95-100 store ({means[1]:.1f})")


def _verdict_cell(v: str) -> str:
    return {"replicated": "**replicated**", "contradicted": "**contradicted**"}.get(v, v)


def render(results: list[ClaimResult], sweeps: dict[str, dict[str, Any]], figures: dict[str, str]) -> str:
    """docs/findings.md as text (deterministic: numbers, order and wording depend on the inputs only)."""
    lines = ["# Findings: the paper's design space at tiny scale, with seeds", "",
             "Generated by `pdl findings --runs results/tiny` from the committed per-run results "
             "(`results/tiny/<sweep>/runs.csv`); do not edit by hand. Every number below is a contrast between "
             "configurations of one sweep, paired by seed, with its 95% t-interval over the seeds "
             "(`analysis/findings.py` states the method; `analysis/claims.py` lists the contrasts).", ""]
    for metric, name in (("average", "On the local-suite Average"), ("loss", "On held-out loss")):
        counts = {v: sum(getattr(r, metric) == v for r in results)
                  for v in ("replicated", "contradicted", "unresolved", "not run")}
        lines += [f"{name}: " + ", ".join(f"{n} {v}" for v, n in counts.items() if n) + f" (of {len(results)} claims).", ""]
    lines += ["## Verdicts", "",
              "| claim | sweep | what is tested | verdict on the Average | on held-out loss |",
              "|:--|:--|:--|:--|:--|"]
    for r in results:
        lines.append(f"| {r.claim.key} ({r.claim.source}) | `{r.claim.sweep}` | {r.claim.text} | "
                     f"{_verdict_cell(r.average)} | {_verdict_cell(r.loss)} |")
    lines += ["", "## How to read this", "",
              f"- A contrast is A − B (or a difference of gains) in Average points (task scores in %, mean of the "
              f"local suite's tasks) and in held-out loss (nats/token). ± is the 95% interval over paired seeds.",
              f"- Verdicts: *gt* (A beats B) is replicated when the interval lies above 0 and contradicted when it lies "
              f"below; *eq* (A ≈ B) is replicated when the interval lies within ± {MARGINS['average']:g} Average points "
              f"(± {MARGINS['loss']:g} nats/token of held-out loss) and contradicted when it lies wholly beyond that "
              f"margin; *ge* / *le* (≈ or better / worse) use the same margin on one side (contradicted only when "
              f"the interval lies wholly beyond it). A claim is replicated when "
              f"all its contrasts are, contradicted when any is, else unresolved. On held-out loss every test is "
              f"mirrored (lower is better).",
              "- The sweeps' tables: Average ± its 95% t-interval over seeds; Δ% ± the delta-method interval, * where "
              "it excludes 0 (as `pdl report` prints them).",
              "- Paper: the same contrast on the paper's printed Averages (one run per row, 100B tokens; "
              "`analysis/paper_data.py`), where the paper has the rows. tiny-1m stands for the paper's 1.9B student, "
              "except in C8, which ranks sizes (tiny-1m for the smallest, 330M; tiny-5m for the largest, 6.8B); "
              "C10's tiny-5m stands for 6.8B too.",
              "- Rows are compared within a sweep only. The same configuration in two sweeps can differ a little: "
              "`table8_top_p_k`'s top-0.95-100 reads its targets re-cut from the sweep's top-1.0-100 store"
              + _same_row_note(sweeps) + "; re-truncating a looser store is not bit-identical to the original cut.", ""]
    lines += _provenance(sweeps)
    for r in results:
        lines += _claim_section(r, figures.get(r.claim.key), sweeps.get(r.claim.sweep))
    return "\n".join(lines).rstrip() + "\n"


def _provenance(sweeps: dict[str, dict[str, Any]]) -> list[str]:
    lines = ["## The runs", "",
             "| sweep | configurations | seeds | runs | trained | copied (`--reuse-runs`) | trial hours | sweep hours "
             "| commit |", "|:--|--:|:--|--:|--:|--:|--:|--:|:--|"]
    trial_hours = total_sweep_hours = 0.0
    for name in dict.fromkeys(c.sweep for c in CLAIMS):
        meta = sweeps.get(name, {}).get("meta")
        if not meta:
            lines.append(f"| `{name}` | not run | | | | | | | |")
            continue
        hours = meta.get("trial_wall_hours")
        trial_hours += hours or 0.0
        sweep_hours = meta.get("sweep_wall_hours")
        total_sweep_hours += sweep_hours or 0.0
        lines.append(f"| `{name}` | {meta.get('configurations')} | {', '.join(map(str, meta.get('seeds', [])))} | "
                     f"{meta.get('runs')} | {meta.get('trained_runs')} | {meta.get('reused_runs')} | "
                     f"{'–' if hours is None else f'{hours:.2f}'} | {'–' if sweep_hours is None else f'{sweep_hours:.2f}'} | "
                     f"{', '.join(c[:7] for c in meta.get('commits', []))} |")
    lines += ["", f"Total: {total_sweep_hours:.1f} sweep hours of wall time, about {2 * total_sweep_hours:.1f} CPU hours "
              f"(two workers on two cores), {trial_hours:.1f} trial hours.", "",
              f"Trial hours: the summed wall time of the trained runs' training and scoring (two workers ran at "
              f"once on a 2-core CPU, so CPU hours ≈ the sweep hours × 2). Sweep "
              f"hours: the sweep's parent run from start to last finish (teacher and store builds included). Machine: "
              f"the project's shared 2-core x86-64 CPU (no GPU). Scale: `sweeps/*.yaml`, `scales.tiny` (800k training "
              f"tokens, a tiny-5m teacher of 600 steps, tiny-1m students for 500 steps of 8 x 128 tokens, 600 items "
              f"per task; `table11_sizes` varies the sizes, `table12_checkpoints` trains 1,500 steps from a 3,000-step "
              f"teacher and `iso_compute` sets the steps from its FLOP budget).", ""]
    return lines


def _sweep_table(sweep: dict[str, Any] | None) -> list[str]:
    """The sweep's paper-style table (means over seeds, Δ% vs its LM-only row), its table lines only."""
    from analysis.render import to_markdown
    from analysis.tables import paper_table

    if sweep is None:
        return []
    table = paper_table(sweep["runs"], extra=["eval.heldout.loss", "eval.heldout.ece"])
    return ["The sweep's table (means over seeds; Δ is relative to the LM-only row of the same group):", ""] + [
        line for line in to_markdown(table).splitlines() if line.startswith("|")] + [""]


def _claim_section(r: ClaimResult, fig: str | None, sweep: dict[str, Any] | None) -> list[str]:
    c = r.claim
    lines = [f"## {c.key}: {c.text}", "",
             f"Sweep `{c.sweep}` ({c.source}). Verdict: {_verdict_cell(r.average)} on the Average, "
             f"{_verdict_cell(r.loss)} on held-out loss.", ""]
    if c.note:
        lines += [c.note, ""]
    lines += _sweep_table(sweep)
    lines += ["| contrast | expects | paper (points) | ours: Average (points) | verdict | ours: held-out loss (nats/token) "
              "| verdict | ECE difference | seeds |", "|:--|:--|--:|--:|:--|--:|:--|--:|--:|"]
    for row in r.rows:
        con, avg, loss = row["contrast"], row["average"], row["loss"]
        lines.append(f"| {con.name} | {TEST_WORDS[con.test]} | {_num(con.paper)} | {_interval(avg, 1)} | "
                     f"{_verdict_cell(avg.verdict)} | {_interval(loss, 3)} | {_verdict_cell(loss.verdict)} | "
                     f"{_num(row['ece'], 4)} | {avg.n} |")
    if r.storage:
        lines += ["", "Bytes per token of each configuration's own targets (`store.target_bytes_per_token`, egsqrt):",
                  "", " · ".join(f"{label} {value:.1f}" for label, value in r.storage)]
        if c.key == "C7":
            lines += ["", f"Storage: {_verdict_cell(storage_verdict(r.storage))} (bytes per token must rise with k at "
                      f"p = 0.95 and with p at k = 100, and top-0.95-100 must take at least {STEEP:g}x the narrowest "
                      "top-0.95-k's bytes); it counts in the claim's verdict on both metrics."]
    if fig:
        lines += ["", f"![{c.key}]({fig})"]
    return lines + [""]


# ------------------------------------------------------------------------------------------------ driver


def write_findings(results_dir: str | Path, out: str | Path) -> Path:
    """Read `results_dir`, write `out` (markdown) and its figures beside it (`<out dir>/findings/`)."""
    sweeps = load_results(results_dir)
    out = Path(out)
    results = [evaluate_claim(c, sweeps.get(c.sweep)) for c in CLAIMS]
    figures = {}
    for r in results:
        path = figure(r, out.parent / FIGURE_DIR / r.claim.key)
        if path is not None:
            figures[r.claim.key] = f"{FIGURE_DIR}/{path.name}"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(render(results, sweeps, figures))
    tmp.replace(out)
    return out
