"""lm-evaluation-harness on an exported model: load lm-eval's own `hf` model once, run each task, collect scores.

Tasks run one at a time on the one loaded model, so a task whose dataset is missing offline fails
alone with a one-line message while the others run. Status lines (each task's score, the held-out
metrics) go to this module's logger; the result is returned, and logged to MLflow given a run id.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

from pd_lightning.errors import ConfigError, DataError
from pd_lightning.evaluation.heldout import check_heldout_sources, heldout_for_dir
from pd_lightning.evaluation.model_dir import check_model_dir, trained_seq_len
from pd_lightning.evaluation.scores import TaskScore, effective_shots, format_score, merge_results, score_task
from pd_lightning.evaluation.suites import check_task_names, resolve_tasks, task_manager_for
from pd_lightning.tracking import check_run, log_to_mlflow

HARNESS_MODEL = "hf"  # lm-eval's HFLM; recorded as the result's `backend` and the run tag `eval.backend`

log = logging.getLogger(__name__)


def load_lm(model_dir: str | Path, *, batch_size: int = 16, device: str = "cpu", dtype: str = "float32",
            max_length: int | None = None):
    """lm-eval's `hf` model on an exported dir, loaded once for all tasks: (lm, its model_args string)."""
    import lm_eval.api.registry
    import lm_eval.models  # noqa: F401  (registers "hf")

    args = f"pretrained={Path(model_dir).resolve()},dtype={dtype}"
    if max_length is not None:
        args += f",max_length={int(max_length)}"
    lm = lm_eval.api.registry.get_model(HARNESS_MODEL).create_from_arg_string(
        args, {"batch_size": batch_size, "device": device})
    return lm, args


def _is_unavailable_dataset(exc: BaseException) -> bool:
    """True when an exception (or its cause) says a dataset could not be found locally or fetched.

    Only errors of the download stack count (so a broken task YAML or a model error still raises):
    connection errors, the datasets / huggingface_hub libraries' own errors, and the datasets
    library's plain FileNotFoundError for a dataset that is not cached.
    """
    while exc is not None:
        module = type(exc).__module__
        if (isinstance(exc, ConnectionError) or module.startswith(("datasets", "huggingface_hub", "requests", "urllib3"))
                or (isinstance(exc, FileNotFoundError) and re.search(r"[Dd]ataset|[Hh]ub|not cached", str(exc)))):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def _dataset_name(exc: BaseException, task: str, tm) -> str:
    """The hub dataset an availability error is about, from its message or the task's YAML."""
    seen = exc
    while seen is not None:
        match = re.search(r"Couldn't reach '([^']+)'|Dataset '?([\w./-]+?)'? (?:is not cached|doesn't exist)", str(seen))
        if match:
            return match.group(1) or match.group(2)
        seen = seen.__cause__ or seen.__context__
    entry = tm.task_index.get(task)
    path = getattr(entry, "yaml_path", None)
    if path:
        try:
            from lm_eval.tasks._yaml_loader import load_yaml

            cfg = load_yaml(path, resolve_func=False)
            if cfg.get("dataset_path"):
                return str(cfg["dataset_path"])
        except Exception:  # the name is only for the message; never fail on it
            pass
    return "its dataset"


def unavailable_message(task: str, dataset: str, exc: BaseException) -> str:
    """One line: which task, which dataset, why, and how to make it available."""
    reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return (f"task {task!r}: dataset {dataset!r} is not available locally ({reason}); run once with network access "
            f"(HF_DATASETS_OFFLINE=0 HF_HUB_OFFLINE=0) to cache it, or set HF_DATASETS_CACHE / HF_HOME to a cache "
            f"that holds it")


def evaluate(
    model_dir: str | Path,
    *,
    suite: str = "local",
    tasks: str | list[str] | None = None,
    batch_size: int = 16,
    device: str = "cpu",
    limit: int | float | None = None,
    run_id: str | None = None,
    tracking_uri: str | None = None,
    tracking_config_file: str | Path = "mlflow.yaml",
    corpus_seed: int = 0,
    max_length: int | None = None,
    num_fewshot: int | None = None,
    heldout_data: str | Path | None = None,
    heldout_teacher: str | Path | None = None,
    heldout_sequences: int = 256,
    ece_bins: int = 15,
) -> dict[str, Any]:
    """Run a suite (or `tasks`) with lm-eval on an exported HF model dir; log to MLflow if run_id is given.

    Returns {"model_dir", "suite", "backend", "max_length", "tasks": {name: TaskScore as dict}, "average",
    "failed": {name: message}, "lm_eval": the merged raw harness results, "heldout": HeldoutMetrics as dict
    or None, "heldout_sources": {"data", "teacher"}}. `limit` caps items per task (harness semantics:
    a fraction if < 1); `num_fewshot` overrides every task's shot count; `max_length` is the
    harness's context window (None: the training seq_len recorded in the export, else the model's).
    `heldout_data`: a prepared data dir whose held-out shards to compute the held-out token metrics
    on (`pd_lightning.metrics`; first `heldout_sequences` sequences, `ece_bins` equal-mass bins),
    with `heldout_teacher` (an HF dir) run live beside the model for agreement and KL; None: skip.
    """
    model_dir = Path(model_dir)
    if limit is not None and not (limit > 0):
        raise ConfigError(f"eval.limit={limit!r} must be positive (items per task, or a fraction < 1)")
    if batch_size < 1:
        raise ConfigError(f"eval.batch_size={batch_size!r} must be a positive integer")
    if max_length is not None and max_length < 2:
        raise ConfigError(f"eval.max_length={max_length!r} must be at least 2 tokens")
    if heldout_data is not None:
        check_heldout_sources(heldout_data, heldout_teacher, heldout_sequences, ece_bins)
    specs = resolve_tasks(suite, tasks)
    tm = task_manager_for([s.task for s in specs], corpus_seed)
    check_task_names(specs, tm)
    check_model_dir(model_dir)
    if run_id is not None:
        check_run(run_id, tracking_uri, tracking_config_file)  # a bad run id fails before the work

    import lm_eval

    if max_length is None:
        # Our small models extrapolate badly past their training length (measured on a tiny-1m
        # trained on 64-token windows: held-out bits per byte 0.66 with the config's 1024-position
        # window vs 0.47 with 64), so score within the training window when the export records it.
        max_length = trained_seq_len(model_dir)
    from safetensors import SafetensorError

    try:
        lm, model_args = load_lm(model_dir, batch_size=batch_size, device=device, max_length=max_length)
    except (OSError, SafetensorError) as exc:  # missing, truncated or corrupt weight files
        raise DataError(f"model_dir={str(model_dir)!r} has no loadable weights: {str(exc).splitlines()[0][:200]}") from None
    heldout = None
    if heldout_data is not None:
        from pd_lightning.metrics import HeldoutMetrics, format_heldout

        heldout = heldout_for_dir(model_dir, heldout_data, heldout_teacher, device=device,
                                  max_sequences=heldout_sequences, bins=ece_bins)
        log.info(f"eval: held-out {format_heldout(HeldoutMetrics(**heldout))}")
    parts: list[dict[str, Any]] = []
    scores: dict[str, TaskScore] = {}
    failed: dict[str, str] = {}
    for spec in specs:
        shots = num_fewshot if num_fewshot is not None else spec.num_fewshot
        try:
            out = lm_eval.simple_evaluate(model=lm, tasks=[spec.task], num_fewshot=shots, batch_size=batch_size,
                                          device=device, limit=limit, task_manager=tm, log_samples=False)
        except Exception as exc:
            if not _is_unavailable_dataset(exc):
                raise
            failed[spec.task] = unavailable_message(spec.task, _dataset_name(exc, spec.task, tm), exc)
            log.warning(failed[spec.task])
            continue
        parts.append(out)
        # Per-task shots are the `num_fewshot` of this task's own harness call. The harness never
        # overrides a task whose YAML pins `num_fewshot: 0` (it only logs that), so say so if a
        # leaf ran at another count than asked.
        ran = {leaf: k for leaf, k in effective_shots(out).items() if shots is not None and k != shots}
        if ran:
            log.warning(f"task {spec.task!r}: asked for {shots}-shot, but the harness ran "
                        + ", ".join(f"{leaf} {k}-shot" for leaf, k in sorted(ran.items())[:3])
                        + (f" and {len(ran) - 3} more" if len(ran) > 3 else "")
                        + " (a task config that pins num_fewshot: 0 is never overridden)")
        scores[spec.task] = score_task(spec, out)
        log.info(f"eval: {format_score(scores[spec.task])}")

    raw = merge_results(parts)
    if raw:
        raw.setdefault("config", {}).update(model=HARNESS_MODEL, model_args=model_args)
    in_avg = [s.value for s in scores.values() if s.in_average]
    result = {
        "model_dir": str(model_dir),
        "suite": None if tasks is not None else suite,
        "backend": HARNESS_MODEL,
        "max_length": getattr(lm, "max_length", max_length),
        "tasks": {name: {**vars(s), "unit": s.unit} for name, s in scores.items()},
        # Only over tasks that ran; a failed task leaves a smaller average, flagged by `failed`.
        "average": sum(in_avg) / len(in_avg) if in_avg else None,
        "failed": failed,
        "lm_eval": raw,
        "heldout": heldout,
        "heldout_sources": {"data": None if heldout_data is None else str(heldout_data),
                            "teacher": None if heldout_teacher is None else str(heldout_teacher)},
    }
    if run_id is not None:
        from pd_lightning.student_model import logged_model_of_dir
        from pd_lightning.tracking import mlflow_client

        run = mlflow_client(tracking_uri, tracking_config_file).get_run(run_id)
        log_to_mlflow(result, run_id, tracking_uri=tracking_uri, tracking_config_file=tracking_config_file,
                      model_id=logged_model_of_dir(run, model_dir))  # the run's own student: its scores, in the Models tab
    return result


def evaluate_with_config(model_dir: str | Path, cfg, *, run_id: str | None = None) -> dict[str, Any]:
    """`evaluate` with the `eval` and `tracking` sections of a PDLConfig (for train and sweep code)."""
    e, t = cfg.eval, cfg.tracking
    # The local tasks must come from the same corpus world the model was trained on.
    corpus_seed = cfg.data.corpus_seed if cfg.data.source == "builtin" else 0
    return evaluate(model_dir, suite=e.suite, tasks=e.tasks, batch_size=e.batch_size, device=e.device, limit=e.limit,
                    run_id=run_id, tracking_uri=t.tracking_uri, tracking_config_file=t.config_file,
                    corpus_seed=corpus_seed)
