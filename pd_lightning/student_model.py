"""A trained student in MLflow: an MLflow 3 logged model of its run, and optionally a registered model version.

MLflow 3 lists a run's students in the experiment's Models tab only as *logged models*; plain artifacts
are invisible there. So `pdl train` logs the exported student (`trainer.out/model`, a transformers dir)
as a pyfunc logged model (`student_pyfunc`: loads the dir with transformers, scores and continues
prompts), linked to its run as the run's output at its last step, with the run's params, design tags
and final metrics, so `mlflow.pyfunc.load_model(f"models:/{model_id}")` gives it back. The run's tag
`pd.model_id` names it (a `--reuse-runs` copy inherits its source's) and `pd.model_dir` the dir it was
logged from, so `pdl eval DIR --run-id RUN` links its scores to the model when DIR is that dir. The
weights are stored once, in the logged model (`<artifact root>/models/<model_id>/artifacts/artifacts/model/`),
not also as run artifacts: at the paper's scale a student is several GB.

`--register NAME` (`pdl train`, `pdl sweep run`) also makes each student a version of the registered
model NAME (the registry references the logged model's files; nothing is copied). Everything takes an
explicit MLflow client; the one exception is registering, which points MLflow's global tracking URI at
the client's store for the duration of the call and restores it (`_global_tracking_uri`: MLflow
resolves a `models:/` source through the global URI, whatever client is asked).
"""

from __future__ import annotations

import contextlib
import logging
import re
import tempfile
import warnings
from pathlib import Path

from pd_lightning.errors import ConfigError

log = logging.getLogger(__name__)

MODEL_ID_TAG = "pd.model_id"  # on a run: the logged model of its student
MODEL_DIR_TAG = "pd.model_dir"  # on a run: the absolute path of the student dir that model was logged from
MODEL_TYPE = "causal-lm"
_LOGGED_NAME_BAD = re.compile(r"[/:.%\"']")  # what MLflow refuses in a logged model's name
HF_DIR = "hf_dir"  # the student dir's key among the model's artifacts (student_pyfunc.HF_DIR)
DEFAULT_NEW_TOKENS = 8  # the signature's default of `max_new_tokens` (what MLflow passes when a caller gives none)
_REQUIREMENTS = ("mlflow", "torch", "transformers", "tokenizers", "safetensors", "pandas")


def check_registered_name(name: str | None, flag: str = "--register") -> str | None:
    """Refuse, before any compute, a registered model name MLflow would reject (one line)."""
    if name is None:
        return None
    if not name.strip() or "/" in name or ":" in name or name.strip() in (".", "..") or name != name.strip():
        raise ConfigError(f"{flag}={name!r} is not a registered model name: it must be non-empty, without '/' or ':' "
                          "and without surrounding spaces (e.g. --register tiny-students)")
    return name


def logged_model_name(run_name: str | None) -> str:
    """The logged model's name: the run's, or `student` (`α = 0.9 seed 0` -> `α = 0_9 seed 0`: MLflow refuses
    / : . % ' " in one)."""
    name = _LOGGED_NAME_BAD.sub("_", run_name or "").strip()
    return name or "student"


def _requirements() -> list[str]:
    """Pinned pip requirements of the model's loader (given, not inferred: MLflow infers them by loading the model
    in a subprocess, which for a paper-scale student means reading GBs once more)."""
    from importlib.metadata import PackageNotFoundError, version

    pins = []
    for dist in _REQUIREMENTS:
        try:
            pins.append(f"{dist}=={version(dist).split('+')[0]}")  # torch 2.13.0+cpu -> torch==2.13.0
        except PackageNotFoundError:
            continue
    return pins


def _signature():
    from mlflow.models.signature import ModelSignature
    from mlflow.types.schema import ColSpec, ParamSchema, ParamSpec, Schema

    return ModelSignature(
        inputs=Schema([ColSpec("string")]),
        outputs=Schema([ColSpec("string", "prompt"), ColSpec("double", "nll"), ColSpec("long", "tokens"),
                        ColSpec("string", "continuation")]),
        params=ParamSchema([ParamSpec("max_new_tokens", "long", DEFAULT_NEW_TOKENS)]))


def log_student(client, run_id: str, model_dir: Path, *, step: int, name: str | None = None,
                tags: dict[str, str] | None = None) -> str:
    """Log `model_dir` as the run's logged model (the module docstring); returns its model id.

    The model's params are the run's, its tags `tags` (the design-space coordinates), and the run's
    metrics at `step` are linked to it (what the Models tab shows beside it), as `mlflow.pyfunc.log_model`
    does; the run gets the tag MODEL_ID_TAG. The pyfunc is staged in a temporary directory beside
    `model_dir` (same disk), uploaded, and deleted.
    """
    import mlflow.pyfunc
    from mlflow.entities import LoggedModelOutput, LoggedModelStatus, Metric
    from mlflow.models import Model

    run = client.get_run(run_id)
    model = client.create_logged_model(run.info.experiment_id, name=logged_model_name(name or run.info.run_name),
                                       source_run_id=run_id, model_type=MODEL_TYPE, tags=dict(tags or {}),
                                       params={k: str(v) for k, v in run.data.params.items()})
    try:
        with tempfile.TemporaryDirectory(prefix=".mlflow-model-", dir=model_dir.parent) as tmp:
            staged = Path(tmp) / "model"
            meta = Model(artifact_path=model.artifact_location, model_uuid=model.model_id, run_id=run_id,
                         model_id=model.model_id)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "no input example": giving one would load the model to check it
                mlflow.pyfunc.save_model(str(staged), python_model=str(Path(__file__).with_name("student_pyfunc.py")),
                                         artifacts={HF_DIR: str(model_dir)}, mlflow_model=meta,
                                         signature=_signature(), pip_requirements=_requirements())
            client.log_model_artifacts(model.model_id, str(staged))
    except BaseException:
        client.finalize_logged_model(model.model_id, LoggedModelStatus.FAILED)
        raise
    client.finalize_logged_model(model.model_id, LoggedModelStatus.READY)
    client.log_outputs(run_id, [LoggedModelOutput(model.model_id, step=step)])
    metrics = [Metric(m.key, m.value, m.timestamp, m.step, model_id=model.model_id, run_id=run_id)
               for key in run.data.metrics for m in client.get_metric_history(run_id, key)
               if m.step == step and m.model_id is None]
    for i in range(0, len(metrics), 1000):  # MLflow's limit per batch
        client.log_batch(run_id, metrics=metrics[i:i + 1000])
    client.set_tag(run_id, MODEL_ID_TAG, model.model_id)
    client.set_tag(run_id, MODEL_DIR_TAG, str(model_dir.resolve()))
    return model.model_id


def logged_model_of_dir(run, model_dir: str | Path) -> str | None:
    """The run's logged model when `model_dir` is the student dir it was logged from, else None (a
    checkpoint or another model scored into the run is not that model)."""
    logged_from = run.data.tags.get(MODEL_DIR_TAG)
    if logged_from is None or Path(model_dir).resolve() != Path(logged_from):
        return None
    return run.data.tags.get(MODEL_ID_TAG)


def register_student(client, run_id: str, name: str) -> str | None:
    """Make the run's logged model (tag MODEL_ID_TAG) a version of registered model `name`; returns the version.

    Idempotent: a model already registered under `name` keeps its version (a resumed or re-run command
    registers nothing twice). None, with a warning, for a run without a logged model (one trained
    before students were logged models).
    """
    import json

    from mlflow.exceptions import MlflowException

    model_id = client.get_run(run_id).data.tags.get(MODEL_ID_TAG)
    if not model_id:
        log.warning("register: run %s has no logged model (tag %s); nothing registered as %r", run_id,
                    MODEL_ID_TAG, name)
        return None
    source = f"models:/{model_id}"
    for version in client.search_model_versions(f"name = '{_quoted(name)}'"):
        # a sqlite registry keeps the source but not the model id: either names the logged model
        if getattr(version, "model_id", None) == model_id or version.source == source:
            return str(version.version)
    try:
        client.create_registered_model(name, description="Students trained by pd-lightning (`--register`).")
    except MlflowException as exc:
        if exc.error_code not in ("RESOURCE_ALREADY_EXISTS", "ALREADY_EXISTS"):
            raise
    with _global_tracking_uri(client._tracking_client.tracking_uri):
        version = client.create_model_version(name, source=source, run_id=run_id, model_id=model_id)
    listed = client.get_logged_model(model_id).tags.get("mlflow.modelVersions")  # what MLflow's own register sets
    entries = (json.loads(listed) if listed else []) + [{"name": name, "version": version.version}]
    client.set_logged_model_tags(model_id, {"mlflow.modelVersions": json.dumps(entries)})
    log.info("register: run %s's student is version %s of registered model %r", run_id, version.version, name)
    return str(version.version)


@contextlib.contextmanager
def _global_tracking_uri(uri: str):
    """MLflow's registry resolves a `models:/<id>` source through the *global* tracking URI, not the client's:
    point it at the client's store for the call (an MLFLOW_TRACKING_URI of another store would not find the
    model), then put back what was there."""
    import mlflow

    before = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(before)


def _quoted(text: str) -> str:
    """`text` inside a single-quoted MLflow filter string."""
    return text.replace("\\", "\\\\").replace("'", "\\'")
