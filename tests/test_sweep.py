"""Sweeps: files validate, every grid point x seed completes exactly once with 2 workers, killed workers'
trials are re-run, a killed sweep continues, a TPE search runs, an invalid point fails alone."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import yaml
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from pd_lightning.errors import ConfigError
from pd_lightning.sweep import load_sweep, point_label

SWEEPS = Path(__file__).resolve().parents[1] / "sweeps"

# A CPU-seconds version of the tiny scale: 200k tokens, a 60-step teacher, 20-step students.
TINY_SET = {
    "data.train_tokens": 200000, "data.heldout_tokens": 20000, "data.vocab_size": 512, "data.seq_len": 64,
    "data.tokenizer_train_chars": 400000, "teacher.preset": "tiny-1m", "teacher.max_steps": 60,
    "teacher.batch_size": 8, "trainer.max_steps": 20, "trainer.batch_size": 8, "trainer.val_every_n_steps": 10,
    "trainer.val_batches": 2, "trainer.num_workers": 0, "trainer.checkpoint_every_n_steps": 10,
    "logits.batch_size": 32, "eval.limit": 20, "eval.tasks": "synth_facts",
}


def write_sweep(folder: Path, file_name: str, **body) -> Path:
    spec = {"name": file_name, "description": f"test sweep {file_name}", "base": "tiny", "set": dict(TINY_SET)}
    spec["set"].update(body.pop("set", {}))
    spec.update(body)
    path = folder / f"{file_name}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False, allow_unicode=True))
    return path


def pdl(*args: str, cwd: Path, **kw) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "pd_lightning.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600, **kw)


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    """One prerequisite cache for every sweep of this module, as sweeps share it in real use."""
    return tmp_path_factory.mktemp("cache")


def study_of(folder: Path, name: str) -> optuna.Study:
    return optuna.load_study(study_name=f"{name}.default", storage=f"sqlite:///{folder / 'optuna.db'}")


def child_runs(folder: Path, experiment: str) -> list:
    client = MlflowClient(tracking_uri=f"sqlite:///{folder / 'mlflow.db'}")
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    return [r for r in runs if r.data.tags.get("pd.role") != "sweep"]


def assert_each_task_once(folder: Path, name: str, n_tasks: int) -> optuna.Study:
    """Exactly one COMPLETE trial and one FINISHED MLflow child run per configuration x seed."""
    study = study_of(folder, name)
    complete = [t for t in study.trials if t.state == TrialState.COMPLETE]
    tasks = [t.user_attrs["pdl.task"] for t in complete]
    assert len(tasks) == n_tasks and len(set(tasks)) == n_tasks, tasks
    runs = child_runs(folder, name)
    assert sorted(r.data.tags["pd.task"] for r in runs) == sorted(tasks)
    assert all(r.info.status == "FINISHED" for r in runs)
    parent = study.user_attrs["pdl.parent_run_id"]
    assert {r.data.tags["mlflow.parentRunId"] for r in runs} == {parent}
    assert all("eval.average" in r.data.metrics for r in runs)
    return study


# ------------------------------------------------------------------------------------------ files


@pytest.mark.parametrize("path", sorted(SWEEPS.glob("*.yaml")), ids=lambda p: p.stem)
@pytest.mark.parametrize("scale", ["tiny", "paper"])
def test_every_sweep_file_validates(path: Path, scale: str):
    from pd_lightning.sweep import check_points

    spec = load_sweep(path, scale)
    assert spec.tasks() or spec.search
    assert check_points(spec) == {}
    assert spec.table and spec.description
    if scale == "paper":
        # A file's top-level `set` applies at every scale: the CPU sizes belong under scales.tiny (iso_compute,
        # sampled_vs_topk and quickstart once trained paper-scale students on 800k tokens)
        for task in spec.tasks()[:3]:
            cfg = spec.config_for(task)
            assert cfg.data.train_tokens >= 1e10 and not cfg.model.preset.startswith("tiny-")
            assert cfg.eval.limit is None and cfg.trainer.batch_size >= 8


def test_sweep_files_cover_the_paper():
    names = {p.stem for p in SWEEPS.glob("*.yaml")}
    for prefix in ("table1_", "table2_", "table3_", "table4_", "table5_", "table6_", "table8_", "table11_",
                   "table12_", "table13_", "quickstart", "search_best"):
        assert any(n.startswith(prefix) for n in names), prefix


def test_points_labels_and_baselines(tmp_path):
    path = write_sweep(tmp_path, "labels", baseline={"label": "LLM-LM", "set": {"loss.alpha": 0.0}},
                       grid={"model.preset": ["tiny-1m", "tiny-5m"], "logits.k": [10, 50]},
                       group_by=["model.preset"], rows=[{"label": "PD", "set": {"loss.alpha": 1.0}}], seeds=[0, 1])
    spec = load_sweep(path)
    tasks = spec.tasks()
    assert len(tasks) == (2 + 2 * 2) * 2  # a baseline per student size + 2 sizes x 2 k, x 2 seeds
    baselines = [t for t in tasks if t.baseline]
    assert {t.group for t in baselines} == {"model.preset=tiny-1m", "model.preset=tiny-5m"}
    assert {t.label for t in tasks if not t.baseline} == {"PD k = 10", "PD k = 50"}
    assert len({t.task_id for t in tasks}) == len(tasks)
    assert len({t.point for t in tasks}) == len(tasks) // 2  # seeds share the configuration's id
    assert spec.loosest_truncation() == (0.95, 100)  # the base config's k=100 is looser than the grid's
    assert point_label({"logits.p": 0.9, "logits.k": 100}) == "top-0.9-100"
    assert point_label({"loss.alpha": 0.9}) == "α = 0.9"



@pytest.mark.parametrize("scale", ["tiny", "paper"])
def test_pd_star_row_is_the_secondary_sources_configuration(scale: str):
    # PD* as AI-made summaries of the paper's appendix A.6 give it (the paper's text is not reachable):
    # top-0.95-50, tau 2.0, KLD, WSD on alpha (peak 0.9) with the WSD learning rate, offline logits.
    spec = load_sweep(SWEEPS / "table13_pd_star.yaml", scale)
    stars = [t for t in spec.tasks() if t.label == "PD*"]
    assert len(stars) == len(spec.grid["model.preset"]) * len(spec.seeds)
    for task in stars:
        cfg = spec.config_for(task)
        lg, loss = cfg.logits, cfg.loss
        assert (lg.p, lg.k, lg.tau, lg.method, lg.mode) == (0.95, 50, 2.0, "none", "offline")
        assert (loss.kind, loss.alpha_schedule) == ("kld", "wsd_alpha")
        # wsd_alpha's peak is loss.wsd_peak, or loss.alpha when that is null (config.LossConfig).
        assert (loss.wsd_peak if getattr(loss, "wsd_peak", None) is not None else loss.alpha) == 0.9
        assert cfg.optim.lr_schedule == "wsd"
    vanilla = next(t for t in spec.tasks() if t.label == "Vanilla PD")
    assert spec.config_for(vanilla).logits.tau == 1.0  # tau 2.0 is PD*'s alone

@pytest.mark.parametrize("body, match", [
    ({"name": "../escape"}, "name='../escape'"),
    ({"grid": {"loss.alpah": [0.1]}}, "did you mean 'alpha'"),
    ({"grid": {"loss.alpha": 0.5}}, "grid.loss.alpha=0.5 must be a non-empty list"),
    ({"grid": {"loss.alpha": [0.5]}, "seeds": [0, 0]}, "lists a seed twice"),
    ({"serach": {}}, "did you mean 'search'"),
    ({"search": {"sampler": "tpe", "trials": 0, "space": {"loss.alpha": {"low": 0, "high": 1}}}}, "search.trials=0"),
    ({"search": {"trials": 2, "space": {"logits.tau": {"low": 0, "high": 2, "log": True}}}}, "must be > 0 with log"),
    ({"grid": {"loss.alpha": [0.5]}, "group_by": ["model.preset"]}, "group_by"),
    ({"grid": {"loss.alpha": [0.5]}, "objective": {"direction": "up"}}, "objective.direction='up'"),
    ({"grid": {"loss.alpha": [0.5]}, "objective": {"metric": "eval.heldout.ecee"}}, "did you mean 'eval.heldout.ece'"),
    ({"grid": {"loss.alpha": [0.5]}, "objective": {"metric": "eval.heldout.ece", "direction": "maximize"}},
     "improves the other way; use minimize"),
    ({"grid": {"loss.alpha": [0.5]}, "objective": {"metric": "eval.icl.copy_random"}, "eval": False}, "needs eval: true"),
    ({"grid": {"loss.alpha": [0.5]}, "budget": {"kind": "joules", "value": 1}}, "budget="),
    ({"base": "no-such-config"}, "base='no-such-config'"),
    ({}, "nothing to run"),
])
def test_bad_sweep_files_are_refused_in_one_line(tmp_path, body, match):
    path = write_sweep(tmp_path, "bad", **body)
    with pytest.raises(ConfigError, match=match.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")) as err:
        load_sweep(path)
    assert "\n" not in str(err.value) and "bad.yaml" in str(err.value)


def test_objective_metrics_are_selected_by_name_with_their_direction(tmp_path):
    from pd_lightning.sweep import objective_metrics

    known = objective_metrics()
    assert known["eval.heldout.ece"] == "minimize" and known["eval.heldout.teacher_top1_agree"] == "maximize"
    assert {"eval.icl.copy_random", "eval.icl.copy_natural", "eval.icl.fewshot_gain"} <= set(known)
    ece = load_sweep(write_sweep(tmp_path, "ece", grid={"loss.alpha": [0.5]}, objective={"metric": "eval.heldout.ece"}))
    assert (ece.objective_metric, ece.direction) == ("eval.heldout.ece", "minimize")  # the metric's own direction
    # held-out metrics are logged by training itself: no lm-eval needed to optimise them
    kl = load_sweep(write_sweep(tmp_path, "kl", grid={"loss.alpha": [0.5]}, eval=False,
                                objective={"metric": "eval.heldout.teacher_kl", "direction": "minimize"}))
    assert kl.direction == "minimize" and not kl.evaluate
    other = load_sweep(write_sweep(tmp_path, "task", grid={"loss.alpha": [0.5]}, objective={"metric": "eval.synth_facts"}))
    assert other.direction == "maximize"  # any other logged metric by name, maximised unless told


def test_cli_validate_and_bad_scale(tmp_path):
    path = write_sweep(tmp_path, "cli", grid={"loss.alpha": [0.5]}, scales={"tiny": {}, "paper": {"set": {"trainer.max_steps": 10}}})
    ok = pdl("sweep", "validate", str(path), cwd=tmp_path)
    assert ok.returncode == 0 and "cli [tiny]" in ok.stdout and "cli [paper]" in ok.stdout
    bad = pdl("sweep", "run", str(path), "--scale", "huge", cwd=tmp_path)
    assert bad.returncode == 2 and "scale 'huge' is not defined" in bad.stderr and "Traceback" not in bad.stderr
    assert not (tmp_path / "runs").exists() and not (tmp_path / "optuna.db").exists()


def test_cli_validate_names_every_store(tmp_path):
    """A sweep with sampled targets builds one sampled store per N beside the top-p-k one: validate says so."""
    path = write_sweep(tmp_path, "draws", grid={"logits.samples": [12, 8]},
                       set={"logits.sampling": "sample", "loss.alpha": 1.0})
    ok = pdl("sweep", "validate", str(path), cwd=tmp_path)
    assert ok.returncode == 0, ok.stderr
    assert " + sampled stores N = 8, 12, objective" in ok.stdout and "store top-" in ok.stdout
    seeds = write_sweep(tmp_path, "seeds", grid={"logits.sample_seed": [0, 1]},  # one store per (N, seed), as the cache
                        set={"logits.sampling": "sample", "logits.samples": 8, "loss.alpha": 1.0})
    ok = pdl("sweep", "validate", str(seeds), cwd=tmp_path)
    assert ok.returncode == 0 and " + sampled stores N = 8 (seed 0), 8 (seed 1), objective" in ok.stdout, ok.stderr


# ------------------------------------------------------------------------------------------ runs


def test_grid_with_two_workers_runs_every_point_once(tmp_path, cache):
    path = write_sweep(tmp_path, "grid2", baseline={"label": "LLM-LM", "set": {"loss.alpha": 0.0}},
                       grid={"loss.alpha": [0.5, 1.0]}, seeds=[0, 1])
    result = pdl("sweep", "run", str(path), "--workers", "2", "--cache", str(cache), cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    study = assert_each_task_once(tmp_path, "grid2", 6)
    assert len(study.trials) == 6  # nothing ran twice
    pids = {t.system_attrs["pdl.pid"] for t in study.trials}
    assert len(pids) == 2  # both workers took trials
    assert "6/6 done" in result.stderr  # progress is logged (stderr); stdout keeps the summary and the table
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert client.get_run(study.user_attrs["pdl.parent_run_id"]).info.status == "FINISHED"
    status = pdl("sweep", "status", str(path), cwd=tmp_path)
    assert status.returncode == 0 and "total: 6 complete" in status.stdout
    again = pdl("sweep", "run", str(path), "--cache", str(cache), cwd=tmp_path)  # nothing left: no new trial
    assert again.returncode == 0 and len(study_of(tmp_path, "grid2").trials) == 6


def _wait(predicate, timeout: float, what: str):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


def test_killed_worker_and_killed_sweep_lose_and_duplicate_nothing(tmp_path, cache):
    path = write_sweep(tmp_path, "kill", grid={"loss.alpha": [0.0, 0.5, 1.0]}, seeds=[0, 1],
                       set={"trainer.max_steps": 60, "trainer.checkpoint_every_n_steps": 10},
                       runner={"heartbeat_interval": 1, "grace_period": 5})
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "pd_lightning.cli", "sweep", "run", str(path), "--workers", "2", "--cache", str(cache)]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    out = tmp_path / "runs" / "sweeps" / "kill" / "default" / "trials"

    def running_with_checkpoint():
        try:
            trials = study_of(tmp_path, "kill").get_trials(states=(TrialState.RUNNING,))
        except KeyError:
            return None
        for t in trials:
            if list((out / t.user_attrs["pdl.task"] / "checkpoints").glob("*.ckpt")) and "pdl.pid" in t.system_attrs:
                return t
        return None

    # 1. SIGKILL one worker mid-trial: the other worker notices the dead pid and re-runs that task.
    victim = _wait(running_with_checkpoint, 300, "a running trial with a checkpoint")
    os.kill(int(victim.system_attrs["pdl.pid"]), signal.SIGKILL)
    # 2. Then SIGKILL the whole sweep (coordinator and workers) once a further trial has completed.
    _wait(lambda: len(study_of(tmp_path, "kill").get_trials(states=(TrialState.COMPLETE,))) >= 2, 300, "2 complete trials")
    finished_before = {t.user_attrs["pdl.task"]: (out / t.user_attrs["pdl.task"] / "model" / "pdl_run.json").stat().st_mtime_ns
                       for t in study_of(tmp_path, "kill").get_trials(states=(TrialState.COMPLETE,))}
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    # 3. The same command again finishes the sweep without redoing anything finished.
    rerun = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    study = assert_each_task_once(tmp_path, "kill", 6)
    crashed = [t for t in study.trials if t.state == TrialState.FAIL]
    assert crashed and all("pdl.error" not in t.user_attrs for t in crashed)
    assert victim.user_attrs["pdl.task"] in {t.user_attrs["pdl.task"] for t in crashed}
    for task, mtime in finished_before.items():
        assert (out / task / "model" / "pdl_run.json").stat().st_mtime_ns == mtime, f"{task} was redone"
    # The killed trial resumed its checkpoint in the same MLflow run: one run per task, none left RUNNING.
    runs = child_runs(tmp_path, "kill")
    assert len(runs) == 6 and all(r.info.status == "FINISHED" for r in runs)


def test_tpe_search_runs(tmp_path, cache):
    path = write_sweep(tmp_path, "tpe", baseline={"label": "LLM-LM", "set": {"loss.alpha": 0.0}},
                       search={"sampler": "tpe", "trials": 3, "seed": 1, "space": {
                           "loss.alpha": {"low": 0.3, "high": 1.0},
                           "logits.k": {"low": 5, "high": 100, "log": True, "type": "int"},
                           "loss.kind": {"choices": ["nll", "kld"]}}},
                       objective={"metric": "heldout_loss", "direction": "minimize"}, eval=False)
    result = pdl("sweep", "run", str(path), "--cache", str(cache), cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    study = study_of(tmp_path, "tpe")
    search = [t for t in study.trials if t.user_attrs.get("pdl.search")]
    assert len(search) == 3 and all(t.state == TrialState.COMPLETE for t in search)
    assert all(0.3 <= t.params["loss.alpha"] <= 1.0 and 5 <= t.params["logits.k"] <= 100 for t in search)
    # every trial, the baseline's too, carries the same design-space coordinates (tests/test_sweep_optuna.py)
    assert all(t.params.keys() == study.trials[0].params.keys() and "seed" not in t.params for t in study.trials)
    assert [t.params["loss.alpha"] for t in study.trials if not t.user_attrs.get("pdl.search")] == [0.0]
    assert study.best_trial.value == min(t.value for t in study.trials if t.value is not None)
    runs = child_runs(tmp_path, "tpe")
    assert len(runs) == 4 and all("heldout_loss" in r.data.metrics for r in runs)
    assert {r.data.tags["pd.kind"] for r in runs} == {"lm", "kd"}


def test_invalid_point_fails_alone_and_is_recorded(tmp_path, cache):
    path = write_sweep(tmp_path, "invalid", grid={"logits.tau": [1.0, -2.0]}, seeds=[0])
    result = pdl("sweep", "run", str(path), "--workers", "2", "--cache", str(cache), cwd=tmp_path)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "1 trial(s) failed" in result.stderr
    study = study_of(tmp_path, "invalid")
    states = {t.user_attrs["pdl.label"]: t for t in study.trials}
    assert states["τ = 1.0"].state == TrialState.COMPLETE
    failed = states["τ = -2.0"]
    assert failed.state == TrialState.FAIL and "logits.tau=-2.0" in failed.user_attrs["pdl.error"]
    runs = {r.data.tags["pd.label"]: r for r in child_runs(tmp_path, "invalid")}
    assert runs["τ = -2.0"].info.status == "FAILED" and "logits.tau" in runs["τ = -2.0"].data.tags["pd.error"]
    assert runs["τ = 1.0"].info.status == "FINISHED"
    status = pdl("sweep", "status", str(path), cwd=tmp_path)
    assert "failed" in status.stdout and "logits.tau=-2.0" in status.stdout


def test_checkpoint_sweep_scores_every_export_and_reports_figure_5(tmp_path, cache):
    path = write_sweep(tmp_path, "ckpt", baseline={"label": "LM Loss", "set": {"loss.alpha": 0.0}},
                       rows=[{"label": "KD Loss", "set": {"loss.alpha": 1.0}}], seeds=[0],
                       set={"trainer.export_every_n_steps": 10})
    result = pdl("sweep", "run", str(path), "--workers", "2", "--cache", str(cache), cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    for run in child_runs(tmp_path, "ckpt"):  # the export at step 10 and the final model at step 20
        steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, "eval.average"))
        assert steps == [10, 20], steps
    report = pdl("report", str(path), "--out", str(tmp_path / "report"), cwd=tmp_path)
    assert report.returncode == 0, report.stderr[-3000:]
    page = (tmp_path / "report" / "index.html").read_text()
    assert "fig_checkpoints.png" in page and (tmp_path / "report" / "fig_checkpoints.png").is_file()


def test_cached_store_survives_moving_the_cache_and_not_retraining_the_teacher(tmp_path):
    """The store key names a cache-built teacher by its settings (not its path) and a user's teacher by its
    files: a moved cache finds its store; a teacher retrained in place does not get the old one."""
    import shutil

    from pd_lightning.sweep import with_prerequisites

    spec = load_sweep(write_sweep(tmp_path, "keys", rows=[{"label": "PD", "set": {"loss.alpha": 1.0}}], seeds=[0]))
    cfg = spec.config_for(spec.tasks()[0])
    built = with_prerequisites(cfg, tmp_path / "cache")
    assert (Path(built.logits.store) / "manifest.json").is_file()
    shutil.move(tmp_path / "cache", tmp_path / "moved")
    found = with_prerequisites(cfg, tmp_path / "moved", build=False)
    assert Path(found.logits.store) == tmp_path / "moved" / Path(built.logits.store).name

    teacher = tmp_path / "my-teacher"  # a teacher of the user's, outside the cache
    shutil.copytree(found.teacher.out, teacher)
    cfg.teacher.path = str(teacher)
    mine = with_prerequisites(cfg, tmp_path / "moved")
    assert Path(mine.logits.store) != Path(found.logits.store)  # another teacher: its own store
    assert with_prerequisites(cfg, tmp_path / "moved", build=False).logits.store == mine.logits.store
    weights = next(teacher.glob("*.safetensors"))
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))  # retrained in place
    again = with_prerequisites(cfg, tmp_path / "moved", build=False)
    assert again.logits.store != mine.logits.store and not Path(again.logits.store).exists()


def test_gpu_groups_give_each_worker_its_own_devices(monkeypatch):
    import torch

    from pd_lightning.sweep import gpu_groups, visible_gpus

    assert gpu_groups(2, 1, []) == [None, None]  # CPU machine: no CUDA_VISIBLE_DEVICES set
    assert gpu_groups(4, 2, [str(i) for i in range(8)]) == ["0,1", "2,3", "4,5", "6,7"]
    assert gpu_groups(2, 1, ["3", "5", "7"]) == ["3", "5"]
    with pytest.raises(ConfigError, match=r"--workers=3 with trainer.devices=2 needs 6 GPUs and 4 are visible "
                                          r"\(0,1,2,3\); use --workers 2$"):
        gpu_groups(3, 2, ["0", "1", "2", "3"])
    with pytest.raises(ConfigError, match="use --workers 1 and fewer trainer.devices"):
        gpu_groups(1, 8, ["0", "1"])
    assert visible_gpus("2, 6,", count=2) == ["2", "6"] and visible_gpus(None, count=3) == ["0", "1", "2"]
    assert visible_gpus("-1", count=0) == [] and visible_gpus("0,1", count=0) == []
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")  # set on a machine without CUDA: still CPU workers
    if not torch.cuda.is_available():
        assert visible_gpus() == []


def test_every_sweep_file_named_in_docs_and_help_exists():
    import re

    root = SWEEPS.parent
    texts = {name: (root / name).read_text() for name in ("README.md", "sweeps/README.md", "pd_lightning/cli.py")}
    named = {(where, m) for where, text in texts.items() for m in re.findall(r"sweeps/([A-Za-z0-9_.-]+\.yaml)", text)}
    assert named, "no sweep file is named anywhere"
    assert [(where, m) for where, m in sorted(named) if not (SWEEPS / m).is_file()] == []


def test_reuse_runs_copies_a_finished_identical_configuration_from_another_sweep(tmp_path, cache):
    from pd_lightning.artifacts import RUN_STATE
    from pd_lightning.sweep.reuse import finished_copy

    first = write_sweep(tmp_path, "first", baseline={"label": "LLM-LM", "set": {"loss.alpha": 0.0}}, seeds=[0],
                        set={"trainer.export_every_n_steps": 10})
    assert pdl("sweep", "run", str(first), "--cache", str(cache), cwd=tmp_path).returncode == 0
    # the same LM-only configuration under another label (τ means nothing at α = 0), beside a row no sweep has run
    second = write_sweep(tmp_path, "second", baseline={"label": "α = 0", "set": {"loss.alpha": 0.0, "logits.tau": 2.0}},
                         rows=[{"label": "α = 0.5", "set": {"loss.alpha": 0.5}}], seeds=[0],
                         set={"trainer.export_every_n_steps": 10})
    result = pdl("sweep", "run", str(second), "--cache", str(cache), "--reuse-runs", cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    src = {r.data.tags["pd.label"]: r for r in child_runs(tmp_path, "first")}
    new = {r.data.tags["pd.label"]: r for r in child_runs(tmp_path, "second")}
    copy, trained = new["α = 0"], new["α = 0.5"]
    assert copy.data.tags["pd.reused_from"] == src["LLM-LM"].info.run_id
    assert "pd.reused_from" not in trained.data.tags  # nothing identical ran before: it trained
    assert copy.data.tags["pd.result_key"] == src["LLM-LM"].data.tags["pd.result_key"]
    assert trained.data.tags["pd.result_key"] != copy.data.tags["pd.result_key"]
    assert copy.data.metrics == src["LLM-LM"].data.metrics
    where = {"trainer.out", "tracking.experiment", "tracking.run_name", "logits.tau"}  # its own config's params
    assert set(copy.data.params) == set(src["LLM-LM"].data.params)
    assert {k for k, v in copy.data.params.items() if src["LLM-LM"].data.params[k] != v} == where
    assert copy.data.params["tracking.experiment"] == "second"
    assert copy.data.tags["mlflow.parentRunId"] == study_of(tmp_path, "second").user_attrs["pdl.parent_run_id"]
    histories = [[(m.step, m.value) for m in client.get_metric_history(r.info.run_id, "eval.average")]
                 for r in (copy, src["LLM-LM"])]
    assert histories[0] == histories[1] and [s for s, _ in histories[0]] == [10, 20]  # checkpoint scores copied
    study = assert_each_task_once(tmp_path, "second", 2)
    values = {t.user_attrs["pdl.run_id"]: t.value for t in study.trials}
    assert values[copy.info.run_id] == copy.data.metrics["eval.average"]
    # a copy a killed worker left half-made is deleted before the task is copied again
    exp = client.get_experiment_by_name("second").experiment_id
    partial = client.create_run(exp, tags={"pd.reused_from": src["LLM-LM"].info.run_id}).info.run_id
    trial_dir = tmp_path / "partial"
    trial_dir.mkdir()
    (trial_dir / RUN_STATE).write_text(json.dumps({"run_id": partial, "reused_from": src["LLM-LM"].info.run_id}))
    assert finished_copy(client, trial_dir) is None
    assert client.get_run(partial).info.lifecycle_stage == "deleted" and not (trial_dir / RUN_STATE).exists()


def test_result_key_ignores_where_a_run_writes_and_an_lm_only_runs_logits_fields():
    from pd_lightning.config import load_config
    from pd_lightning.sweep.reuse import result_key

    def key(*overrides):
        return result_key(load_config("tiny", list(overrides)))

    base = key("loss.alpha=1.0")
    assert key("loss.alpha=1.0", "trainer.out=/elsewhere", "tracking.experiment=other", "tracking.run_name=x") == base
    assert key("loss.alpha=1.0", "logits.k=50") != base and key("loss.alpha=1.0", "trainer.seed=1") != base
    assert key("loss.alpha=0.0", "logits.p=1.0", "logits.store_p=1.0", "loss.kind=kld") == key("loss.alpha=0.0")
    assert key("loss.alpha=0.0", "teacher.preset=tiny-20m") != key("loss.alpha=0.0")  # held-out KL is against it
