"""`pdl quickstart`: the whole lab at tiny scale in one directory — corpus, tokenizer, teacher, logit store,
the quickstart sweep (LM-only vs distilled students, two seeds each), lm-eval, the paper-style report."""

from __future__ import annotations

import os
import time
from pathlib import Path

from pd_lightning.errors import ConfigError, DataError

SWEEP_FILE = Path(__file__).resolve().parents[1] / "sweeps" / "quickstart.yaml"


def quickstart(out: str | Path = "pdl-quickstart", *, workers: int | None = None, sweep_file: str | Path | None = None,
               scale: str = "tiny") -> Path:
    """Run (or continue) the quickstart in `out`; prints the table, the report path and the MLflow UI command."""
    import analysis
    from pd_lightning.report import report_sweep
    from pd_lightning.sweep import load_sweep, resolve_place, run_sweep

    sweep_file = Path(sweep_file or SWEEP_FILE).resolve()
    if not sweep_file.is_file():
        raise DataError(f"the quickstart sweep {str(sweep_file)!r} is missing; install pd-lightning from its source "
                        "tree (`pip install -e .`) so sweeps/ is beside the package")
    workers = workers or min(2, os.cpu_count() or 1)
    if workers < 1:
        raise ConfigError(f"--workers={workers} must be >= 1")
    out = Path(out).resolve()
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out={str(out)!r} is a file; give a directory")
    spec = load_sweep(sweep_file, scale)  # validate before creating anything
    out.mkdir(parents=True, exist_ok=True)
    os.chdir(out)  # everything (MLflow, Optuna, cache, runs) lives under `out`, nothing in the caller's dir
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
    print(f"browse:     mlflow ui --backend-store-uri sqlite:///{out / 'mlflow.db'} --host 127.0.0.1 --port 5000")
    print(f"study:      optuna-dashboard sqlite:///{out / 'optuna.db'} --host 127.0.0.1   (pip install optuna-dashboard)")
    return index
