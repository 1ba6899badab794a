"""Server outages in the middle of a 3-worker sweep: the MLflow tracking server, then (separately) the
PostgreSQL server behind the Optuna study, is stopped while trials train, and started again.

The behaviour pinned for both (pd_lightning/sweep/outages.py): the sweep stops with one line naming the
server (a storage URL with its password redacted), exit code 3; the trials it interrupted are visible
in Optuna as failed; the same command, once the server answers, completes the sweep with exactly one
COMPLETE trial and one FINISHED MLflow child run per configuration x seed, nothing duplicated. A task's
failure that MLflow cannot take waits in the study and is written when MLflow answers again.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from servers import MlflowServer, PostgresServer, find_pg_bin, skip_or_fail
from test_sweep import write_sweep

pytestmark = pytest.mark.slow

# Three LM-only tasks (no teacher, no logit store: only token shards to build), long enough to be
# caught mid-training, checkpointed every 10 steps so the re-run resumes them; no lm-eval.
FAULT_SWEEP = dict(grid={"loss.alpha": [0.0]}, seeds=[0, 1, 2], eval=False,
                   objective={"metric": "heldout_loss", "direction": "minimize"},
                   runner={"heartbeat_interval": 1, "grace_period": 6})
FAULT_SET = {"trainer.max_steps": 40, "trainer.checkpoint_every_n_steps": 10, "trainer.log_every_n_steps": 5}
# The MLflow client gives up after one quick retry (its default rides out ~4 minutes of outage).
CLIENT_ENV = {"OMP_NUM_THREADS": "1", "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
              "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    """One prerequisite cache (token shards) for both outages."""
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def tracking_server(tmp_path_factory) -> MlflowServer:
    """An MLflow tracking server of this module's own (sqlite backend), which the tests stop and start again."""
    root = tmp_path_factory.mktemp("mlflow-faults")
    server = MlflowServer(f"sqlite:///{root / 'backend.db'}", root).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def storage_server() -> PostgresServer:
    """A PostgreSQL cluster of this module's own (the session's also backs other tests' MLflow server)."""
    bin_dir = find_pg_bin()
    if bin_dir is None:
        skip_or_fail("PostgreSQL server binaries (initdb, pg_ctl, postgres) not found")
    server = PostgresServer(bin_dir)
    try:
        yield server.start()
    finally:
        server.stop()


def start_sweep(path: Path, cwd: Path, cache: Path, *extra: str) -> tuple[list[str], subprocess.Popen]:
    cmd = [sys.executable, "-m", "pd_lightning.cli", "sweep", "run", str(path), "--workers", "3", "--threads", "1",
           "--cache", str(cache), *extra]
    return cmd, subprocess.Popen(cmd, cwd=cwd, env=dict(os.environ, **CLIENT_ENV), stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True)


def wait_for_checkpointed_trial(load_study, trials_dir: Path, proc: subprocess.Popen, timeout: float = 300):
    """Block until some trial is RUNNING with a checkpoint on disk (the sweep is mid-training)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        try:
            running = load_study().get_trials(states=(TrialState.RUNNING,))
        except KeyError:  # the study is not created yet
            running = []
        for t in running:
            if list((trials_dir / t.user_attrs["pdl.task"] / "checkpoints").glob("*.ckpt")):
                return t
        time.sleep(0.5)
    raise AssertionError("no trial reached a checkpoint")


def assert_stopped_naming(proc: subprocess.Popen, server: str) -> str:
    """The sweep ends with exit code 3 and one error line naming the server, no traceback."""
    out, err = proc.communicate(timeout=300)
    errors = [line for line in err.splitlines() if line.startswith("pdl: error:")]
    assert proc.returncode == 3, out[-2000:] + err[-3000:]
    assert len(errors) == 1 and server in errors[0] and "run the same command again" in errors[0], err[-3000:]
    assert "Traceback" not in err
    return errors[0]


def assert_each_task_once(study: optuna.Study, tracking_uri: str, experiment: str, n_tasks: int) -> None:
    """Exactly one COMPLETE trial and one FINISHED MLflow child run per configuration x seed, under one parent."""
    complete = [t.user_attrs["pdl.task"] for t in study.trials if t.state == TrialState.COMPLETE]
    assert len(complete) == n_tasks and len(set(complete)) == n_tasks, complete
    client = MlflowClient(tracking_uri=tracking_uri)
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id], max_results=100)
    children = [r for r in runs if r.data.tags.get("pd.role") != "sweep"]
    parents = [r for r in runs if r.data.tags.get("pd.role") == "sweep"]
    assert sorted(r.data.tags["pd.task"] for r in children) == sorted(complete)  # nothing duplicated
    assert all(r.info.status == "FINISHED" and "heldout_loss" in r.data.metrics for r in children)
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert {r.data.tags["mlflow.parentRunId"] for r in children} == {parents[0].info.run_id}


def test_mlflow_outage_stops_the_sweep_and_the_same_command_completes_it(tmp_path, cache, tracking_server):
    path = write_sweep(tmp_path, "mlflow_down", set={**FAULT_SET, "tracking.tracking_uri": tracking_server.url},
                       **FAULT_SWEEP)
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"  # the default beside a tracking server: the working dir

    def study() -> optuna.Study:
        return optuna.load_study(study_name="mlflow_down.default", storage=storage)

    cmd, proc = start_sweep(path, tmp_path, cache)
    wait_for_checkpointed_trial(study, tmp_path / "runs/sweeps/mlflow_down/default/trials", proc)
    port = tracking_server.port
    tracking_server.stop()
    assert_stopped_naming(proc, f"the MLflow tracking server http://127.0.0.1:{port} is unreachable")
    interrupted = [t for t in study().trials if t.state == TrialState.FAIL]
    assert interrupted, "no trial was interrupted"
    for t in interrupted:  # visible as failed, with the error and the mark that makes the next run redo them
        assert t.user_attrs["pdl.outage"] and f"127.0.0.1:{port}" in t.user_attrs["pdl.error"]
    assert not [t for t in study().trials if t.state == TrialState.RUNNING]  # nothing left claimed

    tracking_server.start(port=port)
    again = subprocess.run(cmd, cwd=tmp_path, env=dict(os.environ, **CLIENT_ENV), capture_output=True, text=True,
                           timeout=600)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert_each_task_once(study(), tracking_server.url, "mlflow_down", 3)
    assert {t.number for t in study().trials if t.state == TrialState.FAIL} == {t.number for t in interrupted}


def test_storage_outage_stops_the_sweep_and_the_same_command_completes_it(tmp_path, cache, storage_server):
    url = storage_server.create_database("faults")
    path = write_sweep(tmp_path, "storage_down", set=FAULT_SET, **FAULT_SWEEP)  # MLflow: sqlite in the working dir

    def study() -> optuna.Study:
        return optuna.load_study(study_name="storage_down.default", storage=optuna.storages.RDBStorage(url))

    cmd, proc = start_sweep(path, tmp_path, cache, "--storage", url)
    wait_for_checkpointed_trial(study, tmp_path / "runs/sweeps/storage_down/default/trials", proc)
    storage_server.pause()
    try:
        line = assert_stopped_naming(proc, f"the Optuna storage postgresql+psycopg2://pdl:***@127.0.0.1:"
                                           f"{storage_server.port}/faults is unreachable")
        assert storage_server.password not in line
    finally:
        storage_server.resume()
    stopped = {t.number for t in study().trials if t.state == TrialState.RUNNING}
    assert stopped  # what the storage could not be told: its workers are gone, the next claim fails and redoes it

    again = subprocess.run(cmd, cwd=tmp_path, env=dict(os.environ, **CLIENT_ENV), capture_output=True, text=True,
                           timeout=600)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert_each_task_once(study(), f"sqlite:///{tmp_path / 'mlflow.db'}", "storage_down", 3)
    failed = {t.number for t in study().trials if t.state == TrialState.FAIL}
    assert stopped <= failed  # the interrupted trials stay visible as failed; their tasks completed in new trials


def test_a_failure_mlflow_cannot_take_waits_in_the_study_until_it_answers(tmp_path, tracking_server):
    from pd_lightning.sweep import create_study, load_sweep, resolve_place
    from pd_lightning.sweep.records import parent_run, pending_failures, record_failure, write_pending_failures

    spec = load_sweep(write_sweep(tmp_path, "pending", grid={"logits.tau": [-2.0]}, seeds=[0],
                                  set={"tracking.tracking_uri": tracking_server.url}))
    place = resolve_place(spec, out=str(tmp_path / "out"), cache=str(tmp_path / "cache"),
                          storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    study = create_study(spec, place)
    parent = parent_run(spec, study, place.storage)
    task = spec.tasks()[0]
    port = tracking_server.port
    tracking_server.stop()
    try:
        os.environ.update(MLFLOW_HTTP_REQUEST_MAX_RETRIES="0")
        assert record_failure(spec, study, task, place, parent, 7, "logits.tau=-2.0 must be > 0") is False
    finally:
        os.environ.pop("MLFLOW_HTTP_REQUEST_MAX_RETRIES")
        tracking_server.start(port=port)
    pending = pending_failures(study)
    assert list(pending) == [7] and pending[7]["message"] == "logits.tau=-2.0 must be > 0"
    assert write_pending_failures(spec, study, place, parent) == 1
    assert pending_failures(study) == {} and write_pending_failures(spec, study, place, parent) == 0  # once
    client = MlflowClient(tracking_uri=tracking_server.url)
    runs = client.search_runs([client.get_experiment_by_name("pending").experiment_id],
                              filter_string=f"tags.`pd.task` = '{task.task_id}'")
    assert len(runs) == 1 and runs[0].info.status == "FAILED"
    assert runs[0].data.tags["pd.error"] == "logits.tau=-2.0 must be > 0" and runs[0].data.tags["pd.trial"] == "7"
