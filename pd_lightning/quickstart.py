"""`pdl quickstart`: the whole lab at tiny scale in one directory — corpus, tokenizer, teacher, logit store,
the quickstart sweep (LM-only vs distilled students, two seeds each), lm-eval, the paper-style report."""

from __future__ import annotations

import os
import time
from pathlib import Path

from pd_lightning.errors import ConfigError, DataError

SWEEP_NAME = "quickstart"  # the shipped sweep (sweeps/quickstart.yaml)


def quickstart(out: str | Path = "pdl-quickstart", *, workers: int | None = None, sweep_file: str | Path | None = None,
               scale: str = "tiny", tracking_uri: str | None = None) -> Path:
    """Run (or continue) the quickstart in `out`; prints the table, the report path and the MLflow UI command.

    `tracking_uri`: record the runs there instead of `out/mlflow.db` (a relative sqlite path is the caller's).
    """
    import analysis
    from pd_lightning.config import absolute_tracking_uri
    from pd_lightning.report import report_sweep
    from pd_lightning.sweep import load_sweep, resolve_place, resolve_sweep_path, run_sweep
    from pd_lightning.sweep.records import tracking_uri as sweep_tracking_uri

    try:
        sweep_file = resolve_sweep_path(sweep_file or SWEEP_NAME).resolve()
    except ConfigError as exc:
        raise DataError(f"the quickstart sweep is missing ({exc})") from None
    workers = workers or min(2, os.cpu_count() or 1)
    if workers < 1:
        raise ConfigError(f"--workers={workers} must be >= 1")
    out = Path(out).resolve()
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out={str(out)!r} is a file; give a directory")
    uri = absolute_tracking_uri(tracking_uri) if tracking_uri else None  # before the chdir below
    spec = load_sweep(sweep_file, scale, tracking_uri=uri)  # validate before creating anything
    out.mkdir(parents=True, exist_ok=True)
    os.chdir(out)  # everything (cache, runs; MLflow and Optuna unless --tracking-uri names another store) lives
    #                under `out`, nothing in the caller's dir
    if uri:  # read again here: whether the URI differs from the store the sweep names depends on the working dir
        spec = load_sweep(sweep_file, scale, tracking_uri=uri)
    started = time.perf_counter()
    print(f"quickstart: everything goes to {out}; {workers} worker(s); re-running continues where it stopped", flush=True)
    place = resolve_place(spec, out=None, cache=None, storage=None)
    problems = run_sweep(spec, place, workers=workers)
    index, table = report_sweep(spec, out / "report")
    print()
    print(analysis.to_markdown(table))
    print()
    minutes = (time.perf_counter() - started) / 60
    print(f"quickstart: done in {minutes:.1f} min" + (f" ({problems} trial(s) failed: see above)" if problems else ""))
    print(f"report:     {index}")
    print(f"browse:     mlflow ui --backend-store-uri {absolute_tracking_uri(sweep_tracking_uri(spec))} --host 127.0.0.1 "
          "--port 5000")
    print(f"then open:  {_experiment_page(spec)}   (the training view; the sweep's summary is its parent run)")
    print(f"study:      optuna-dashboard {place.storage} --host 127.0.0.1   (pip install optuna-dashboard)")
    return index


def _experiment_page(spec) -> str:
    """The quickstart experiment's runs in MLflow's training view (`tracking.training_view_url`)."""
    from mlflow.tracking import MlflowClient

    from pd_lightning.sweep.outages import redact
    from pd_lightning.sweep.records import tracking_uri
    from pd_lightning.tracking import training_view_url

    uri = tracking_uri(spec)
    experiment = MlflowClient(tracking_uri=uri).get_experiment_by_name(spec.experiment)
    return training_view_url(redact(uri), experiment.experiment_id)
