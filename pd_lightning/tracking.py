"""MLflow: explicit tracking URIs (sqlite in the working dir by default), experiments, run tags."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from pd_lightning.config import PDLConfig
from pd_lightning.errors import ConfigError

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
DEFAULT_ARTIFACTS = "./mlartifacts"


def tracking_settings(cfg: PDLConfig) -> dict[str, str | None]:
    """tracking_uri, artifact_location and experiment: config fields first, then `tracking.config_file`."""
    file_settings: dict[str, Any] = {}
    path = Path(cfg.tracking.config_file)
    if path.is_file():
        try:
            file_settings = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError:
            raise ConfigError(f"tracking.config_file={str(path)!r} is not valid YAML") from None
        if not isinstance(file_settings, dict):
            raise ConfigError(f"tracking.config_file={str(path)!r} must hold a mapping (tracking_uri, artifact_location, experiment)")
    uri = cfg.tracking.tracking_uri or file_settings.get("tracking_uri") or DEFAULT_TRACKING_URI
    if "://" not in uri and not uri.startswith("sqlite:"):
        raise ConfigError(f"tracking.tracking_uri={uri!r} must be a URI such as sqlite:///mlflow.db or "
                          "http://127.0.0.1:5000 (MLflow 3 has no plain-directory file store)")
    if cfg.tracking.tracking_uri is None and file_settings.get("artifact_location"):
        artifacts = file_settings["artifact_location"]
    elif uri.startswith("sqlite:///"):
        # Artifacts live beside the sqlite store they belong to, wherever that is.
        artifacts = str(Path(uri[len("sqlite:///"):]).resolve().parent / "mlartifacts")
    elif uri.startswith(("http://", "https://")):
        artifacts = None  # a tracking server: its own artifact root (--artifacts-destination), not this machine's dir
    else:
        artifacts = DEFAULT_ARTIFACTS
    if artifacts is not None and "://" not in artifacts:
        artifacts = Path(artifacts).resolve().as_uri()
    experiment = cfg.tracking.experiment or file_settings.get("experiment") or "pd-lightning"
    return {"tracking_uri": uri, "artifact_location": artifacts, "experiment": experiment}


def design_tags(cfg: PDLConfig, *, teacher: str | None) -> dict[str, str]:
    """Tags for the design-space coordinates of a run (what analysis groups and filters by)."""
    lm_only = cfg.loss.alpha == 0.0
    return {
        "pd.kind": "lm" if lm_only else "kd",
        "pd.p": str(cfg.logits.p),
        "pd.k": str(cfg.logits.k),
        "pd.tau": str(cfg.logits.tau),
        "pd.method": cfg.logits.method,
        "pd.loss": cfg.loss.kind,
        "pd.alpha": str(cfg.loss.alpha),
        "pd.alpha_schedule": cfg.loss.alpha_schedule,
        "pd.lr_schedule": cfg.optim.lr_schedule,
        "pd.student": cfg.model.preset,
        "pd.teacher": "" if lm_only else (teacher or ""),
        "pd.logits_mode": "" if lm_only else cfg.logits.mode,
        "pd.seed": str(cfg.trainer.seed),
    }
