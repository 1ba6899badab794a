"""`pdl train`: LM-only and PD runs as complete MLflow records, the PD gain, kill -9 + resume, refusals."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient
from transformers import AutoModelForCausalLM

from pd_lightning._source import source_commit
from pd_lightning.artifacts import RUN_INFO
from pd_lightning.config import load_config
from pd_lightning.data.prepare import prepare
from pd_lightning.errors import ConfigError, DataError
from pd_lightning.plan import COTRAIN_TEACHER, RunKind, plan_run, run_kind
from pd_lightning.train import RunSummary, TrainingDiverged, latest_checkpoint, train

from conftest import TINY_DATA


def run_args(tiny_data: Path, store: Path, out: Path, uri: str, *extra: str) -> list[str]:
    return ["tiny", *TINY_DATA, f"data.out={tiny_data}", f"logits.store={store}", f"trainer.out={out}",
            f"tracking.tracking_uri={uri}", "tracking.experiment=test", "trainer.batch_size=16",
            "trainer.val_every_n_steps=20", "trainer.val_batches=2", "trainer.log_every_n_steps=5",
            "trainer.checkpoint_every_n_steps=10", "optim.lr=5e-3", *extra]


@pytest.fixture(scope="module")
def lm_and_pd(tiny_data, tiny_store, tmp_path_factory):
    """An LM-only and a PD (alpha 0.9) run of 60 steps each at equal tokens, in one sqlite MLflow store."""
    root = tmp_path_factory.mktemp("runs")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    lm = train(load_config(run_args(tiny_data, tiny_store, root / "lm", uri)[0],
                           run_args(tiny_data, tiny_store, root / "lm", uri, "loss.alpha=0", "trainer.max_steps=60")[1:]))
    pd = train(load_config("tiny", run_args(tiny_data, tiny_store, root / "pd", uri, "loss.alpha=0.9",
                                            "trainer.max_steps=60")[1:]))
    return uri, root, lm, pd


def test_runs_are_complete_mlflow_records(lm_and_pd):
    uri, root, lm, pd = lm_and_pd
    client = MlflowClient(uri)
    for summary, kind in ((lm, "lm"), (pd, "kd")):
        run = client.get_run(summary["run_id"])
        assert run.info.status == "FINISHED"
        assert run.data.tags["pd.kind"] == kind and run.data.tags["pd.student"] == "tiny-1m"
        assert run.data.params["loss.alpha"] == ("0.0" if kind == "lm" else "0.9")
        assert len(run.data.params) > 60  # the whole flattened config
        for metric in ("train/loss", "train/lm_loss", "train/kd_loss", "train/alpha", "train/lr", "train/tokens_per_s",
                       "val/loss", "heldout_loss"):
            assert metric in run.data.metrics, metric
        history = client.get_metric_history(summary["run_id"], "train/loss")
        assert len(history) >= 10
        assert run.info.artifact_uri.startswith(root.resolve().as_uri())  # beside the sqlite store, not in the cwd
        artifacts = {a.path for a in client.list_artifacts(summary["run_id"])}
        assert "config.yaml" in artifacts and "model" not in artifacts  # the student is the run's logged model
        model = client.get_logged_model(run.data.tags["pd.model_id"])
        assert model.source_run_id == summary["run_id"] and model.status == "READY"
        assert [o.model_id for o in run.outputs.model_outputs] == [model.model_id]
        assert run.data.tags["mlflow.source.git.commit"] == source_commit()
    pd_run = client.get_run(pd["run_id"])
    assert pd_run.data.metrics["train/alpha"] == pytest.approx(0.9)
    assert 1 <= pd_run.data.metrics["train/teacher_support"] <= 100
    assert pd_run.data.tags["pd.teacher"]
    assert client.get_run(lm["run_id"]).data.metrics["train/kd_loss"] == 0.0
    model = AutoModelForCausalLM.from_pretrained(root / "pd" / "model", local_files_only=True)
    assert model.config.num_hidden_layers == 4


def test_distillation_beats_lm_only_at_equal_tokens(lm_and_pd):
    _, _, lm, pd = lm_and_pd
    assert lm["tokens"] == pd["tokens"]
    assert pd["heldout_loss"] < lm["heldout_loss"], (pd["heldout_loss"], lm["heldout_loss"])


def test_heldout_metrics_beside_the_loss_in_one_pass(lm_and_pd, tiny_store, tmp_path):
    from pd_lightning.evaluation import heldout_defaults
    from pd_lightning.logits.store import LogitStore
    from pd_lightning.metrics import HELDOUT_METRICS

    uri, root, lm, pd = lm_and_pd
    client = MlflowClient(uri)
    teacher = LogitStore(tiny_store).manifest["teacher"]
    runs = {}
    for name, summary in (("lm", lm), ("pd", pd)):
        run = client.get_run(summary["run_id"])
        m = runs[name] = run.data.metrics
        assert {f"eval.heldout.{k}" for k in HELDOUT_METRICS} <= set(m)
        assert m["eval.heldout.loss"] == m["heldout_loss"] == summary["heldout_loss"]
        assert 0 < m["eval.heldout.ece"] < 0.5 and 0 < m["eval.heldout.teacher_top1_agree"] < 1 < m["eval.heldout.brier"] + 1
        # the LM-only run is measured against the teacher of the store beside it, so its row has a reference
        assert run.data.tags["eval.heldout.teacher"] == teacher and summary["heldout_teacher"] == teacher
        assert m["cost.heldout_seconds"] > 0
        saved = json.loads(Path(client.download_artifacts(summary["run_id"], "eval/heldout.json", str(tmp_path))).read_text())
        assert len(saved["bins"]) == 15 and sum(b["n"] for b in saved["bins"]) == saved["tokens"]
        assert heldout_defaults(root / name / "model") == (Path(summary["data"]), Path(teacher))
    # distillation pulls the student toward its teacher: lower KL(teacher ‖ student), more top-1 agreement
    assert runs["pd"]["eval.heldout.teacher_kl"] < runs["lm"]["eval.heldout.teacher_kl"], runs
    assert runs["pd"]["eval.heldout.teacher_top1_agree"] > runs["lm"]["eval.heldout.teacher_top1_agree"], runs


def test_rerun_of_a_finished_run_is_a_noop(lm_and_pd, tiny_data, tiny_store, pdl_log):
    uri, root, lm, _ = lm_and_pd
    again = train(load_config("tiny", run_args(tiny_data, tiny_store, root / "lm", uri, "loss.alpha=0",
                                               "trainer.max_steps=60")[1:]))
    assert again["run_id"] == lm["run_id"] and "nothing to do" in pdl_log.text
    assert again == lm  # the summary read back from the run's RUN_INFO is the one the run returned


def test_a_run_summary_is_typed_and_reads_as_the_dict_it_replaced(lm_and_pd):
    _, root, lm, _ = lm_and_pd
    assert isinstance(lm, RunSummary) and lm.run_id == lm["run_id"] and lm.steps == lm["steps"] == 60
    assert lm.get("exports", None) == [] and "heldout_loss" in lm and "_file" not in lm
    assert dict(lm) == lm.as_dict() and set(lm) == set(lm.info()) | {"exports"}
    assert json.loads((root / "lm" / "model" / RUN_INFO).read_text()) == lm.info()  # RUN_INFO: no private keys


def test_a_run_is_planned_once_from_its_config_and_inputs(tiny_data, tiny_store):
    base = ["tiny", *TINY_DATA, f"data.out={tiny_data}", f"logits.store={tiny_store}"]
    lm = plan_run(load_config(base[0], [*base[1:], "loss.alpha=0"]))
    pd = plan_run(load_config(base[0], [*base[1:], "loss.alpha=0.9"]))
    co = plan_run(load_config(base[0], [*base[1:], "loss.alpha=0.5", "logits.mode=cotrain", "teacher.preset=tiny-1m"]))
    assert (lm.kind, pd.kind, co.kind) == (RunKind.LM_ONLY, RunKind.OFFLINE_STORE, RunKind.COTRAIN)
    assert pd.reads_store and not lm.reads_store and not co.reads_store
    assert pd.distills and co.distills and not lm.distills
    assert lm.store_manifest is None and co.store_manifest is None and pd.teacher == pd.store_manifest["teacher"]
    assert lm.teacher is None and co.teacher == "cotrain:tiny-1m" and pd.sequence_map is None
    assert lm.heldout_teacher == Path(pd.teacher) and co.heldout_teacher == COTRAIN_TEACHER  # eval.heldout_teacher=auto
    assert len({lm.digest, pd.digest, co.digest}) == 3
    # alpha = 0 is the LM-only baseline whatever logits.mode says
    assert run_kind(load_config("tiny", ["loss.alpha=0", "logits.mode=cotrain"])) is RunKind.LM_ONLY


def test_kill_9_and_resume_gives_identical_weights(tiny_data, tiny_store, tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    common = ["loss.alpha=0.9", "loss.alpha_schedule=wsd_alpha", "optim.lr_schedule=wsd", "trainer.max_steps=40"]
    reference = train(load_config("tiny", run_args(tiny_data, tiny_store, tmp_path / "ref", uri, *common)[1:]))

    out = tmp_path / "killed"
    args = run_args(tiny_data, tiny_store, out, uri, *common)
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")  # same float reduction order as this process
    proc = subprocess.Popen([sys.executable, "-m", "pd_lightning.cli", "train", *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    deadline = time.time() + 300
    while time.time() < deadline and not list((out / "checkpoints").glob("step00000020.ckpt")):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "model").exists(), "the run finished before it could be killed"
    run_id = json.loads((out / "run.json").read_text())["run_id"]

    resumed = train(load_config("tiny", args[1:]))
    assert resumed["run_id"] == run_id  # the same MLflow run continues
    a = AutoModelForCausalLM.from_pretrained(tmp_path / "ref" / "model", local_files_only=True).state_dict()
    b = AutoModelForCausalLM.from_pretrained(out / "model", local_files_only=True).state_dict()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert resumed["heldout_loss"] == reference["heldout_loss"]
    # The training-loop clock travels in the checkpoints, so cost.wall_seconds spans both sessions.
    ckpt = torch.load(latest_checkpoint(out / "checkpoints"), weights_only=True)
    clock = next(state for key, state in ckpt["callbacks"].items() if "WallClock" in key)
    assert 0 < clock["elapsed"] <= resumed["cost"]["cost.wall_seconds"]
    client = MlflowClient(uri)
    assert client.get_run(run_id).info.status == "FINISHED"
    steps = [m.step for m in client.get_metric_history(run_id, "train/loss")]
    assert max(steps) >= 35


def test_store_from_another_tokenizer_is_refused_before_training(tiny_store, tmp_path):
    other = tmp_path / "other"
    prepare(load_config("tiny", ["data.train_tokens=30000", "data.heldout_tokens=3000", "data.vocab_size=400",
                                 "data.tokenizer_train_chars=100000", "data.seq_len=64", f"data.out={other}"]).data)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = load_config("tiny", [f"data.out={other}", f"logits.store={tiny_store}", f"trainer.out={tmp_path / 'run'}",
                               f"tracking.tracking_uri={uri}", "loss.alpha=0.9", "data.vocab_size=400"])
    with pytest.raises(DataError, match="tokenizer"):
        train(cfg)
    assert not (tmp_path / "run").exists()


def test_non_finite_loss_stops_with_the_step_and_marks_the_run_failed(tiny_data, tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = load_config("tiny", run_args(tiny_data, tmp_path / "none", tmp_path / "run", uri, "loss.alpha=0",
                                       "optim.lr=1e30", "optim.grad_clip=0", "optim.warmup_frac=0",
                                       "trainer.max_steps=30")[1:])
    with pytest.raises(TrainingDiverged, match=r"at step \d+") as info:
        train(cfg)
    assert "\n" not in str(info.value)
    run_id = json.loads((tmp_path / "run" / "run.json").read_text())["run_id"]
    assert MlflowClient(uri).get_run(run_id).info.status == "FAILED"


def test_gpu_only_settings_are_refused_on_a_cpu_machine_before_anything_is_written(tiny_data, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible: FSDP is allowed here")
    for bad in (["trainer.strategy=fsdp"], ["trainer.accelerator=gpu"]):
        cfg = load_config("tiny", [*TINY_DATA, f"data.out={tiny_data}", "loss.alpha=0", f"trainer.out={tmp_path / 'r'}",
                                   f"tracking.tracking_uri=sqlite:///{tmp_path / 'm.db'}", *bad])
        with pytest.raises(ConfigError, match="GPU"):
            train(cfg)
        assert not (tmp_path / "r").exists() and not (tmp_path / "m.db").exists()
