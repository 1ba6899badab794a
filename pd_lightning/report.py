"""`pdl report`: a sweep's paper-style table and figures as index.html, also on the sweep's MLflow parent run."""

from __future__ import annotations

from pathlib import Path

from pd_lightning.errors import DataError
from pd_lightning.sweep import SweepSpec


def sweep_runs(spec: SweepSpec):
    """The finished child runs of this sweep at this scale, as analysis.load_runs rows."""
    import analysis
    from pd_lightning.tracking import tracking_settings

    uri = tracking_settings(spec.base_config())["tracking_uri"]
    never_run = DataError(f"sweep {spec.name} [{spec.scale}] has no finished, evaluated runs in {uri}; run "
                          f"`pdl sweep run {spec.path}` first (in this directory, or set tracking.tracking_uri)")
    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///"):]).is_file():
        raise never_run
    runs = analysis.load_runs(uri, experiment=spec.experiment, sweep=spec.name)
    if "pd.scale" in runs:
        runs = runs[runs["pd.scale"] == spec.scale]
    if runs.empty or "eval.average" not in runs:
        raise never_run
    return runs, uri


def report_sweep(spec: SweepSpec, out: str | Path | None = None) -> tuple[Path, object]:
    """Write the sweep's report (index.html, table.md/.csv/.tex, figures); returns (index path, paper table)."""
    import analysis
    from analysis.report import build_report
    from mlflow.tracking import MlflowClient

    runs, uri = sweep_runs(spec)
    out_dir = Path(out) if out else Path("runs") / "sweeps" / spec.name / spec.scale / "report"
    title = f"{spec.name} [{spec.scale}]" + (f" — {spec.table}" if spec.table else "")
    rows = [t.label for t in spec.baseline_points()[:1] + spec.grid_points()]
    rows = None if spec.search else list(dict.fromkeys(r for r in rows if r in set(runs["pd.label"])))
    curves = None
    exports = runs.get("param.trainer.export_every_n_steps")
    if exports is not None and not exports.astype(str).isin(["0", "None", "nan", ""]).all():  # Table 12 runs
        group = runs["pd.group"].fillna("").astype(str) if "pd.group" in runs else ""
        labelled = runs.assign(_curve=(group + " " + runs["pd.label"].astype(str)).str.strip())
        curves = analysis.checkpoint_curves(uri, labelled, label_column="_curve")
    # held-out calibration per run (eval/heldout.json): the report's reliability diagram
    reliability = analysis.reliability_bins(uri, runs)
    index = build_report(runs, out_dir, title=title, description=spec.description, rows=rows or None, curves=curves,
                         reliability=reliability)
    table = analysis.paper_table(runs, rows=rows or None, extra="auto")
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name(spec.experiment)
    parents = client.search_runs([experiment.experiment_id], filter_string=(
        f"tags.`pd.role` = 'sweep' and tags.`pd.sweep` = '{spec.name}' and tags.`pd.scale` = '{spec.scale}'"))
    if parents:  # the report shows in the MLflow UI beside the sweep's runs
        client.log_artifacts(parents[0].info.run_id, str(index.parent), "report")
    return index, table
