"""The sweep's MLflow parent run as its summary: which configuration won, by how much, and how far the sweep got.

MLflow shows a run's own metrics, tags, params and description, not its children's, so a parent that
only groups child runs says nothing on its page. The coordinator (`pdl sweep run`, when it ends, also
when a resumed sweep finds nothing left to do) writes onto it:

    metrics   summary.best_mean          the best configuration's mean objective over its seeds (MLflow's
                                         unit: `eval.average` as a fraction), best by the objective's direction
              summary.best_seeds         the seeds that mean is over
              summary.best_average       its Average over the eval tasks, % (the paper table's column)
              summary.best_delta_pct     its Δ% against the LM-only baseline of its group (analysis.paper_table)
              summary.best_delta_ci95    the half-width of Δ%'s 95% interval (NaN-free: absent with one seed)
              summary.trials_<state>     tasks (and search trials) by state: complete, failed, running,
                                         waiting, pending, crashed, interrupted (`pdl sweep status`'s count)
              summary.trials_total, summary.configurations, summary.seeds (the file's plan),
              summary.runs_finished, summary.configurations_finished (what the numbers above are over)
    tags      summary.best_label (+ summary.best_group), summary.objective, summary.baseline,
              summary.best_delta_ci_excludes_0, summary.status (a one-line reason when there is no best or Δ),
              mlflow.note.content (the run's description: the same in a few lines of markdown, then the file's
              description), mlflow.source.name / .type (the sweep file, LOCAL),
              mlflow.source.git.commit and pd.version (the coordinator's code)
    params    objective.metric, objective.direction, scale, seeds, base, study (once: MLflow params are
              immutable; the file as it is now is the artifact sweep.yaml, logged again each time)

Metrics are logged at step = the number of complete trials, so their history shows the summary as the
sweep grew. A sweep with no finished run, no eval scores or no baseline still gets its counts and a
summary.status saying why the rest is missing. Writing the summary never fails the sweep: any error is
a warning in the log (`write_summary`).
"""

from __future__ import annotations

import logging
import math
import warnings
from dataclasses import dataclass, field
from typing import Any

from pd_lightning.sweep.spec import SweepSpec

log = logging.getLogger(__name__)

PREFIX = "summary."
STATES = ("complete", "failed", "running", "waiting", "pending", "crashed", "interrupted")


@dataclass
class SweepSummary:
    """What the parent run gets (the module docstring): metrics, tags, the note and the params."""

    metrics: dict[str, float] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    params: dict[str, str] = field(default_factory=dict)
    note: str = ""
    step: int = 0


def _finished_runs(spec: SweepSpec, uri: str):
    """The sweep's finished child runs of this study (its scale), as analysis.load_runs rows."""
    import analysis

    runs = analysis.load_runs(uri, experiment=spec.experiment, sweep=spec.name)
    if "pd.study" in runs:
        runs = runs[runs["pd.study"] == spec.study_name].reset_index(drop=True)
    elif len(runs):
        runs = runs.iloc[0:0]
    return runs


def _best(spec: SweepSpec, runs) -> dict[str, Any] | None:
    """The configuration with the best mean objective over its seeds: label, group, mean (MLflow unit), seeds."""
    import pandas as pd

    from analysis.tables import config_labels
    from pd_lightning.tracking import is_accuracy_metric

    metric = spec.objective_metric
    if runs.empty or metric not in runs or runs[metric].isna().all():
        return None
    work = pd.DataFrame({"label": config_labels(runs),
                         "group": runs["pd.group"].fillna("").astype(str) if "pd.group" in runs else "",
                         "value": pd.to_numeric(runs[metric], errors="coerce")}).dropna(subset=["value"])
    means = work.groupby(["group", "label"], sort=False)["value"].agg(["mean", "count"]).reset_index()
    row = means.loc[means["mean"].idxmax() if spec.direction == "maximize" else means["mean"].idxmin()]
    unit = 100.0 if is_accuracy_metric(metric) else 1.0  # load_runs gives accuracy-like scores in percent
    return {"label": str(row["label"]), "group": str(row["group"]), "mean": float(row["mean"]) / unit,
            "seeds": int(row["count"]), "configurations": len(means)}


def _delta(runs, best: dict[str, Any]) -> tuple[dict[str, Any] | None, str]:
    """The best configuration's paper-table row (Average, Δ%, its interval), or None and why not."""
    from analysis.tables import AVERAGE, DELTA, DELTA_CI, DELTA_SIG, summarize
    from pd_lightning.errors import UserError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tasks some runs lack: the table leaves them out, as the report does
            table = summarize(runs)
    except UserError as exc:
        return None, f"no Δ: {exc}"
    row = table[(table["group"] == best["group"]) & (table["label"] == best["label"])]
    if row.empty:
        return None, "no Δ: the best configuration has no eval scores"
    row = row.iloc[0]
    found = {"average": float(row[AVERAGE]), "delta": float(row[DELTA]), "ci": float(row[DELTA_CI]),
             "excludes_zero": bool(row[DELTA_SIG]), "baseline": bool(row["baseline"])}
    baselines = table.loc[(table["group"] == best["group"]) & table["baseline"], "label"]
    found["baseline_label"] = str(baselines.iloc[0]) if len(baselines) else ""
    if found["baseline"]:
        return found, "no Δ: the best configuration is the LM-only baseline itself"
    if not found["baseline_label"]:
        return found, "no Δ: the sweep has no LM-only baseline (pd.baseline=true) in this group"
    if not _finite(found["delta"]):
        return found, f"no Δ: the baseline {found['baseline_label']} has no Average of the eval tasks"
    return found, ""


def _finite(value: float) -> bool:
    return isinstance(value, float) and math.isfinite(value)


def build_summary(spec: SweepSpec, study, uri: str) -> SweepSummary:
    """The summary of the sweep as it stands (reads the study and the MLflow store; writes nothing)."""
    from pd_lightning._source import COMMIT_TAG, VERSION_TAG, source_tags
    from pd_lightning.sweep.status import state_counts

    counts = state_counts(study, spec)
    configurations = len({(t.group, t.point) for t in spec.tasks()}) + (spec.search["trials"] if spec.search else 0)
    s = SweepSummary(step=counts.get("complete", 0))
    s.metrics = {f"{PREFIX}trials_{state}": float(counts.get(state, 0)) for state in STATES}
    s.metrics |= {f"{PREFIX}trials_total": float(sum(counts.values())),
                  f"{PREFIX}configurations": float(configurations), f"{PREFIX}seeds": float(len(spec.seeds))}
    objective = f"{spec.objective_metric} ({spec.direction})"
    s.tags = {f"{PREFIX}objective": objective, "mlflow.source.name": str(spec.path.resolve()),
              "mlflow.source.type": "LOCAL", **source_tags()}
    s.params = {"objective.metric": spec.objective_metric, "objective.direction": spec.direction, "scale": spec.scale,
                "seeds": ",".join(map(str, spec.seeds)), "base": str(spec.base), "study": spec.study_name}
    runs = _finished_runs(spec, uri)
    s.metrics[f"{PREFIX}runs_finished"] = float(len(runs))
    best = _best(spec, runs)
    lines = []
    if best is None:
        status = ("no finished run yet" if runs.empty else
                  f"no finished run logged the objective {spec.objective_metric}")
        lines.append(f"**No best configuration yet**: {status}.")
    else:
        shown = f"{best['label']} ({best['group']})" if best["group"] else best["label"]
        s.metrics |= {f"{PREFIX}best_mean": best["mean"], f"{PREFIX}best_seeds": float(best["seeds"]),
                      f"{PREFIX}configurations_finished": float(best["configurations"])}
        s.tags[f"{PREFIX}best_label"] = best["label"]
        if best["group"]:
            s.tags[f"{PREFIX}best_group"] = best["group"]
        seeds = f"{best['seeds']} seed{'s' if best['seeds'] != 1 else ''}"
        lines.append(f"**Best configuration: {shown}**, by the mean `{spec.objective_metric}` over its {seeds} "
                     f"({spec.direction}): {best['mean']:.4g}.")
        row, status = _delta(runs, best)
        if row is not None and _finite(row["average"]):
            s.metrics[f"{PREFIX}best_average"] = row["average"]
        if row is not None and row["baseline_label"]:
            s.tags[f"{PREFIX}baseline"] = row["baseline_label"]
        if not status:
            s.metrics[f"{PREFIX}best_delta_pct"] = row["delta"]
            interval = " (no 95% interval: one seed)"
            if _finite(row["ci"]):
                s.metrics[f"{PREFIX}best_delta_ci95"] = row["ci"]
                s.tags[f"{PREFIX}best_delta_ci_excludes_0"] = str(row["excludes_zero"]).lower()
                interval = (f" ± {row['ci']:.2f} (95% interval over seeds, which "
                            f"{'excludes' if row['excludes_zero'] else 'includes'} 0)")
            lines.append(f"**Δ = {row['delta']:+.2f}%**{interval} on the Average of the eval tasks "
                         f"({row['average']:.2f}%), against the LM-only baseline {row['baseline_label']}.")
        else:
            lines.append(f"{status[0].upper()}{status[1:]}.")
    s.tags[f"{PREFIX}status"] = status if best is None or status else "ok"
    shown_counts = ", ".join(f"{counts.get(state, 0)} {state}" for state in STATES[:4])
    shown_counts += "".join(f", {counts[state]} {state}" for state in STATES[4:] if counts.get(state))
    lines.append(f"Trials: {shown_counts} ({configurations} configuration{'s' if configurations != 1 else ''} x "
                 f"{len(spec.seeds)} seed{'s' if len(spec.seeds) != 1 else ''}; {len(runs)} finished run"
                 f"{'s' if len(runs) != 1 else ''}).")
    tags = source_tags()
    lines.append(f"Sweep file: `{spec.path.resolve()}` (artifact `sweep.yaml`), scale {spec.scale}, study "
                 f"`{spec.study_name}`; code: pd-lightning {tags[VERSION_TAG]}, commit `{tags[COMMIT_TAG]}`.")
    lines.append(f"The paper-style table and figures: `pdl report {spec.name} --scale {spec.scale}` logs them here "
                 "as `report/index.html`.")
    description = spec.description.strip()
    s.note = f"### {spec.name} [{spec.scale}]{' — ' + spec.table if spec.table else ''}\n\n" + "\n\n".join(lines)
    if description:
        s.note += f"\n\n---\n\n{description}"
    return s


def write_summary(spec: SweepSpec, study, parent_id: str) -> bool:
    """Write the summary onto the parent run; returns whether it was written (never raises: a warning instead)."""
    try:
        _write(spec, study, parent_id)
        return True
    except Exception as exc:  # the sweep's own outcome stands; its summary is only a view of it
        from pd_lightning.sweep.outages import one_line

        log.warning("sweep: could not write the summary onto the MLflow parent run %s: %s", parent_id, one_line(exc))
        return False


def _write(spec: SweepSpec, study, parent_id: str) -> None:
    import time

    from mlflow.entities import Metric, Param, RunTag
    from mlflow.tracking import MlflowClient

    from pd_lightning.sweep.records import tracking_uri

    uri = tracking_uri(spec)
    summary = build_summary(spec, study, uri)
    client = MlflowClient(tracking_uri=uri)
    present = client.get_run(parent_id).data.params
    now = int(time.time() * 1000)
    client.log_batch(parent_id, metrics=[Metric(k, v, now, summary.step) for k, v in summary.metrics.items()],
                     params=[Param(k, v) for k, v in summary.params.items() if k not in present],
                     tags=[RunTag(k, v) for k, v in (summary.tags | {"mlflow.note.content": summary.note}).items()])
    client.log_text(parent_id, spec.path.read_text(), "sweep.yaml")  # the file as it is now
