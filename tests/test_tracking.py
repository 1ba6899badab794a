"""Tracking settings: explicit URIs always; artifacts beside a sqlite store, a server's own root for http."""

from __future__ import annotations

from pathlib import Path

import pytest

from pd_lightning.config import load_config
from pd_lightning.errors import ConfigError
from pd_lightning.tracking import tracking_settings


def settings(tmp_path: Path, *overrides: str, file: str | None = None) -> dict:
    config_file = tmp_path / "mlflow.yaml"
    if file is not None:
        config_file.write_text(file)
    return tracking_settings(load_config("tiny", [f"tracking.config_file={config_file}", *overrides]))


def test_sqlite_store_keeps_artifacts_beside_it(tmp_path):
    s = settings(tmp_path, f"tracking.tracking_uri=sqlite:///{tmp_path}/db/mlflow.db")
    assert s["artifact_location"] == (tmp_path / "db" / "mlartifacts").as_uri()


def test_tracking_server_uses_its_own_artifact_root(tmp_path):
    s = settings(tmp_path, "tracking.tracking_uri=http://127.0.0.1:5000")
    assert s["tracking_uri"] == "http://127.0.0.1:5000" and s["artifact_location"] is None


def test_config_file_is_read_and_a_plain_directory_refused(tmp_path):
    s = settings(tmp_path, file="tracking_uri: http://127.0.0.1:5001\nartifact_location: s3://bucket/a\nexperiment: team\n")
    assert (s["tracking_uri"], s["artifact_location"], s["experiment"]) == ("http://127.0.0.1:5001", "s3://bucket/a", "team")
    with pytest.raises(ConfigError, match="tracking_uri='runs/mlflow'"):
        settings(tmp_path, "tracking.tracking_uri=runs/mlflow")


def test_eval_metric_names():
    from pd_lightning.tracking import check_run, metric_items, resolve_tracking_uri

    def score(value, percent=True, metric="acc", stderr=1.0, extra=None):
        return {"value": value, "percent": percent, "metric": metric, "stderr": stderr, "extra": extra or {}}

    # The result is in percent (display); MLflow gets lm-eval's fractions for accuracy-like scores only.
    result = {"tasks": {"synth_facts": score(40.0), "icl_facts_5shot": score(55.0),
                        "synth_heldout": score(2.5, False, "bits_per_byte", None, {"byte_perplexity": 5.7}),
                        "lambada": score(3.2, False, "perplexity", 0.1, {"acc": 61.0})},
              "average": 40.0, "heldout": None}
    assert metric_items(result) == pytest.approx({
        "eval.synth_facts": 0.40, "eval.synth_facts.stderr": 0.01,
        "eval.icl.facts_5shot": 0.55, "eval.icl.facts_5shot.stderr": 0.01,  # ICL probes: outside eval.<task>
        "eval.synth_heldout.bits_per_byte": 2.5, "eval.synth_heldout.byte_perplexity": 5.7,
        "eval.lambada.perplexity": 3.2, "eval.lambada.perplexity.stderr": 0.1, "eval.lambada.acc": 0.61,
        "eval.icl.fewshot_gain": 0.15, "eval.average": 0.40}, rel=1e-12)
    assert resolve_tracking_uri("sqlite:///x.db") == "sqlite:///x.db"
    with pytest.raises(ConfigError, match="tracking.tracking_uri='runs/mlflow'"):
        check_run("abc", "runs/mlflow")


def test_which_eval_metrics_are_accuracy_like():
    from pd_lightning.tracking import is_accuracy_metric

    accuracy = ["eval.synth_facts", "eval.synth_facts.stderr", "eval.average", "eval.icl.copy_random",
                "eval.icl.copy_random.stderr", "eval.icl.fewshot_gain", "eval.lambada.acc", "eval.gsm8k",
                "eval.lambada.acc.stderr", "eval.ceval-valid"]
    other = ["eval.synth_heldout.bits_per_byte", "eval.synth_heldout.word_perplexity", "eval.lambada.perplexity",
             "eval.lambada.perplexity.stderr", "eval.heldout.top1_acc", "eval.heldout.ece", "heldout_loss",
             "val/loss", "cost.total_flops"]
    assert [k for k in accuracy if not is_accuracy_metric(k)] == []
    assert [k for k in other if is_accuracy_metric(k)] == []


def test_experiments_open_in_mlflows_training_view(tmp_path):
    """A training run's experiment (created by the lab, real sqlite store) carries mlflow.experimentKind."""
    from mlflow.tracking import MlflowClient

    from pd_lightning.tracking import EXPERIMENT_KIND, EXPERIMENT_KIND_TAG, ensure_experiment
    from pd_lightning.train import _mlflow_run

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = load_config("tiny", [f"tracking.config_file={tmp_path / 'none.yaml'}", f"tracking.tracking_uri={uri}",
                               "tracking.experiment=kinds"])
    logger, resumed = _mlflow_run(cfg, tmp_path / "out", "digest", None)
    client = MlflowClient(tracking_uri=uri)
    run = client.get_run(logger.run_id)
    assert not resumed and EXPERIMENT_KIND == "custom_model_development"
    assert client.get_experiment(run.info.experiment_id).tags[EXPERIMENT_KIND_TAG] == "custom_model_development"
    # An experiment made before the tag existed gets it; a kind the user chose is kept.
    old = client.create_experiment("old")
    assert ensure_experiment(client, "old") == old and client.get_experiment(old).tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND
    mine = client.create_experiment("mine", tags={EXPERIMENT_KIND_TAG: "finetuning"})
    assert ensure_experiment(client, "mine") == mine and client.get_experiment(mine).tags[EXPERIMENT_KIND_TAG] == "finetuning"


def test_training_view_links_name_the_workflow_type():
    """MLflow 3.17's UI picks GenAI or training view by its own per-browser switch: the lab's links name it."""
    from pd_lightning.tracking import training_view_url

    assert training_view_url("sqlite:///mlflow.db", "3") == "http://127.0.0.1:5000/#/experiments/3/runs?workflowType=machine_learning"
    assert (training_view_url("http://mlflow.lab:5000/", "3", "abc")
            == "http://mlflow.lab:5000/#/experiments/3/runs/abc?workflowType=machine_learning")
