"""MLflow runs -> one pandas row per finished training run (tags, metrics, params).

Units: analysis works in the paper's unit, so accuracy-like eval scores (`eval.<task>`, `eval.average`,
`eval.icl.*`, their stderrs) come out of `load_runs` and `metric_history` in percent. MLflow holds them as
fractions, as lm-eval reports them, on runs tagged `eval.unit=fraction`; runs logged before that tag
hold percentages and are read as they are (`pd_lightning.tracking.is_accuracy_metric`).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pd_lightning.errors import ConfigError, DataError
from pd_lightning.tracking import EVAL_UNIT, EVAL_UNIT_TAG, is_accuracy_metric

BASE_COLUMNS = ["run_id", "run_name", "status", "start_time", "parent_run_id"]
# Design-space tags that also get a numeric column (tags are strings in MLflow).
NUMERIC_TAGS = {"pd.alpha": "alpha", "pd.p": "p", "pd.k": "k", "pd.tau": "tau", "pd.seed": "seed"}
SWEEP_ROLE_TAG = "pd.role"


def _client(tracking_uri: str):
    """An MlflowClient on an explicit URI; refuses plain paths and sqlite files that do not exist.

    A missing sqlite file is an error rather than an empty store: MLflow would silently create a
    new, empty database there, and the user would see "no runs" instead of "wrong path".
    """
    if not isinstance(tracking_uri, str) or ("://" not in tracking_uri and not tracking_uri.startswith("sqlite:")):
        raise ConfigError(f"tracking_uri={tracking_uri!r} must be a URI such as sqlite:///mlflow.db or "
                          "http://127.0.0.1:5000 (MLflow 3 has no plain-directory file store)")
    if tracking_uri.startswith("sqlite:///"):
        path = Path(tracking_uri[len("sqlite:///"):])
        if str(path) not in ("", ":memory:") and not path.is_file():
            raise DataError(f"tracking_uri={tracking_uri!r}: no MLflow store at {path.resolve()}; "
                            "set PDL_TRACKING_URI or pass the URI of the store your runs were logged to")
    with warnings.catch_warnings():
        # mlflow imports tqdm.auto, which warns in a notebook without ipywidgets: noise, not news.
        warnings.filterwarnings("ignore", message="IProgress not found")
        from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri)


def _experiment_ids(client: Any, experiment: str | None) -> list[str]:
    """The ids of the named experiment, or of every active experiment when `experiment` is None."""
    if experiment is None:
        return [e.experiment_id for e in client.search_experiments()]
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        names = sorted(e.name for e in client.search_experiments())
        raise ConfigError(f"experiment={experiment!r} is not in the MLflow store; "
                          f"expected one of {', '.join(names) or '(none: the store is empty)'}")
    return [exp.experiment_id]


def _search(client: Any, experiment_ids: list[str], filter_string: str) -> list[Any]:
    """Every run matching the filter, following MLflow's page tokens."""
    from mlflow.entities import ViewType

    runs: list[Any] = []
    token = None
    while True:
        page = client.search_runs(experiment_ids, filter_string=filter_string, run_view_type=ViewType.ACTIVE_ONLY,
                                  max_results=1000, page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def percent_scale(tags: dict[str, str]) -> float:
    """What a run's accuracy-like eval metrics are multiplied by to be percent: 100 for fractions, else 1."""
    return 100.0 if tags.get(EVAL_UNIT_TAG) == EVAL_UNIT else 1.0


def in_table_units(metrics: dict[str, float], tags: dict[str, str]) -> dict[str, float]:
    """A run's metrics with its accuracy-like eval scores in percent (see the module docstring)."""
    scale = percent_scale(tags)
    return {key: value * scale if is_accuracy_metric(key) else value for key, value in metrics.items()}


def _row(run: Any) -> dict[str, Any]:
    """One run's flat row: info, pd.* tags (strings), parent id, latest metrics, params as param.*."""
    info, data = run.info, run.data
    row: dict[str, Any] = {
        "run_id": info.run_id,
        "run_name": info.run_name,
        "status": info.status,
        "start_time": pd.Timestamp(info.start_time, unit="ms", tz="UTC") if info.start_time else pd.NaT,
        "parent_run_id": data.tags.get("mlflow.parentRunId"),
    }
    row.update({k: v for k, v in data.tags.items() if k.startswith("pd.")})
    row.update(in_table_units(data.metrics, data.tags))
    row.update({f"param.{k}": v for k, v in data.params.items()})
    return row


def _add_numeric_tags(df: pd.DataFrame) -> pd.DataFrame:
    """alpha, p, k, tau (float) and seed (nullable int) from their string tags; NaN where absent."""
    for tag, col in NUMERIC_TAGS.items():
        values = pd.to_numeric(df[tag], errors="coerce") if tag in df else pd.Series(np.nan, index=df.index)
        df[col] = values.round().astype("Int64") if col == "seed" else values.astype(float)
    return df


def _order_columns(df: pd.DataFrame) -> pd.DataFrame:
    """Base columns, pd.* tags, numeric tag columns, metrics, then param.* (each group sorted)."""
    tags = sorted(c for c in df.columns if c.startswith("pd."))
    params = sorted(c for c in df.columns if c.startswith("param."))
    numeric = list(NUMERIC_TAGS.values())
    fixed = set(BASE_COLUMNS) | set(tags) | set(params) | set(numeric)
    metrics = sorted(c for c in df.columns if c not in fixed)
    return df[BASE_COLUMNS + tags + numeric + metrics + params]


def _sweep_names(sweep: str | Iterable[str] | None) -> list[str | None]:
    if sweep is None:
        return [None]
    names = [sweep] if isinstance(sweep, str) else list(sweep)
    for name in names:
        if not isinstance(name, str) or not name or "'" in name:
            raise ConfigError(f"sweep={name!r} must be a non-empty sweep name without quotes (e.g. table10_alpha)")
    return names


def load_runs(tracking_uri: str, experiment: str | None = None, sweep: str | Iterable[str] | None = None, *,
              include_unfinished: bool = False) -> pd.DataFrame:
    """One row per finished training run of an MLflow store (sweep parent runs are skipped).

    Columns: run_id, run_name, status, start_time (UTC), parent_run_id, every `pd.*` tag (strings,
    as logged), numeric copies alpha/p/k/tau (float) and seed (Int64), every metric (latest value:
    eval.*, heldout_loss, tokens, cost.*, ...) and every param as `param.<name>` (strings).
    Rows are ordered by start time, so "order of first appearance" is the order the runs were made.

    `experiment`: an experiment name (default: all experiments). `sweep`: one sweep name or several
    (the `pd.sweep` tag). An empty selection gives an empty frame with the base columns.
    """
    client = _client(tracking_uri)
    ids = _experiment_ids(client, experiment)
    rows: list[dict[str, Any]] = []
    seen: set[str] = set()
    for name in _sweep_names(sweep):
        filter_string = "" if name is None else f"tags.`pd.sweep` = '{name}'"
        for run in (_search(client, ids, filter_string) if ids else []):
            if run.info.run_id in seen or run.data.tags.get(SWEEP_ROLE_TAG) == "sweep":
                continue
            if not include_unfinished and run.info.status != "FINISHED":
                continue
            seen.add(run.info.run_id)
            rows.append(_row(run))
    df = pd.DataFrame(rows)
    for col in BASE_COLUMNS:
        if col not in df:
            df[col] = pd.Series(dtype=object)
    df = _add_numeric_tags(df)
    if len(df):
        df = df.sort_values("start_time", kind="stable").reset_index(drop=True)
    return _order_columns(df)


def metric_history(tracking_uri: str, run_id: str, key: str) -> pd.DataFrame:
    """Every logged value of one metric of one run: columns step, value (sorted by step).

    A step logged twice keeps its latest value (a resumed run may re-log a checkpoint's score). An
    accuracy-like eval score is in percent, as in `load_runs`.
    """
    from mlflow.exceptions import MlflowException

    client = _client(tracking_uri)
    try:
        run = client.get_run(run_id)
    except MlflowException:
        raise ConfigError(f"run_id={run_id!r} is not a run in the MLflow store {tracking_uri}") from None
    scale = percent_scale(run.data.tags) if is_accuracy_metric(key) else 1.0
    history = client.get_metric_history(run_id, key)
    df = pd.DataFrame([(m.step, m.timestamp, m.value * scale) for m in history],
                      columns=["step", "timestamp", "value"])
    df = df.sort_values(["step", "timestamp"], kind="stable").drop_duplicates("step", keep="last")
    return df[["step", "value"]].astype({"step": int, "value": float}).reset_index(drop=True)


def _tokens_at(steps: pd.Series, tokens: pd.DataFrame) -> pd.Series:
    """Tokens consumed at each step: the `tokens` metric where logged at that step, else scaled
    linearly from its last logged point (tokens per step is constant within a run)."""
    if tokens.empty:
        return pd.Series(np.nan, index=steps.index)
    exact = dict(zip(tokens["step"], tokens["value"]))
    last = tokens.iloc[-1]
    per_step = last["value"] / last["step"] if last["step"] > 0 else np.nan
    return steps.map(lambda s: exact.get(s, s * per_step))


def checkpoint_curves(tracking_uri: str, runs: pd.DataFrame, key: str = "eval.average",
                      label_column: str = "pd.label") -> pd.DataFrame:
    """Score-vs-tokens curves for `fig_checkpoints`: columns label, run_id, step, tokens, value.

    One curve per run of `runs` (Table 12 / Fig. 5: a metric logged at several checkpoints); the
    label is `label_column` (falling back to run_name). `tokens` is NaN when the run logged no
    `tokens` metric; `fig_checkpoints` then plots against steps.
    """
    if "run_id" not in runs:
        raise ConfigError("runs has no run_id column; pass a frame returned by analysis.load_runs")
    parts = []
    for _, run in runs.iterrows():
        hist = metric_history(tracking_uri, run["run_id"], key)
        if hist.empty:
            continue
        label = run.get(label_column)
        hist.insert(0, "label", label if isinstance(label, str) and label else run["run_name"])
        hist.insert(1, "run_id", run["run_id"])
        hist["tokens"] = _tokens_at(hist["step"], metric_history(tracking_uri, run["run_id"], "tokens"))
        parts.append(hist[["label", "run_id", "step", "tokens", "value"]])
    if not parts:
        return pd.DataFrame(columns=["label", "run_id", "step", "tokens", "value"])
    return pd.concat(parts, ignore_index=True)


def no_runs_message(sweep: str | None) -> str:
    """What a notebook prints when a store holds no runs of the sweep it shows."""
    if sweep is None:
        return "no finished runs in this store; run `pdl sweep run sweeps/<name>.yaml` first"
    return f"no runs of sweep {sweep} in this store; run `pdl sweep run sweeps/{sweep}.yaml`"


def load_sweep_runs(tracking_uri: str, sweep: str | Iterable[str] | None) -> pd.DataFrame | None:
    """The finished runs of a sweep for a notebook, or None after printing why there are none.

    A missing store or an unknown sweep is the normal state of a fresh checkout, so a notebook
    prints one line saying what to run instead of stopping with a traceback.
    """
    from pd_lightning.errors import UserError

    try:
        runs = load_runs(tracking_uri, sweep=sweep)
    except UserError as err:
        print(err)
        return None
    if runs.empty:
        names = [sweep] if sweep is None or isinstance(sweep, str) else list(sweep)
        print("; ".join(no_runs_message(name) for name in names))
        return None
    return runs


def select_sweep(runs: pd.DataFrame | None, sweep: str) -> pd.DataFrame | None:
    """The rows of one sweep out of `runs`, or None (after printing what to run) when it has none."""
    if runs is None or "pd.sweep" not in runs or not (runs["pd.sweep"] == sweep).any():
        print(no_runs_message(sweep))
        return None
    return runs[runs["pd.sweep"] == sweep].reset_index(drop=True)


HELDOUT_ARTIFACT = "eval/heldout.json"  # pd_lightning.evaluation.log_heldout
RELIABILITY_COLUMNS = ["label", "run_id", "bin", "conf", "acc", "n", "ece"]


def reliability_bins(tracking_uri: str, runs: pd.DataFrame, label_column: str = "pd.label") -> pd.DataFrame:
    """The held-out reliability bins of each run, for `fig_reliability`: columns label, run_id, bin, conf, acc, n, ece.

    Read from each run's `eval/heldout.json` artifact (written with the eval.heldout.* metrics by
    `pdl train` and `pdl eval`): one row per equal-mass bin, in confidence order; runs without the
    artifact are left out (an empty frame when none has it).
    """
    import json
    import tempfile

    from mlflow.exceptions import MlflowException

    if "run_id" not in runs:
        raise ConfigError("runs has no run_id column; pass a frame returned by analysis.load_runs")
    client = _client(tracking_uri)
    rows = []
    with tempfile.TemporaryDirectory(prefix="pdl-reliability-") as tmp:
        for _, run in runs.iterrows():
            try:
                path = client.download_artifacts(run["run_id"], HELDOUT_ARTIFACT, tmp)
                data = json.loads(Path(path).read_text(encoding="utf-8"))
            except (MlflowException, OSError, ValueError):
                continue  # a run from before held-out metrics, or one logged without them
            label = run.get(label_column)
            label = label if isinstance(label, str) and label else run["run_name"]
            for b, entry in enumerate(data.get("bins", [])):
                rows.append({"label": label, "run_id": run["run_id"], "bin": b, "conf": float(entry["conf"]),
                             "acc": float(entry["acc"]), "n": int(entry["n"]), "ece": float(data["ece"])})
    return pd.DataFrame(rows, columns=RELIABILITY_COLUMNS)
