"""A sweep shared by three `pdl sweep run` processes through a real PostgreSQL study and a real MLflow
tracking server; one "machine" loses its worker to SIGKILL mid-trial and the others re-run that trial
once its heartbeat is stale. Every grid point x seed ends with one COMPLETE trial and one FINISHED run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from test_sweep import write_sweep


@pytest.fixture()
def study_url(postgres_server) -> str:
    return postgres_server.create_database(f"sweep_{os.getpid()}_{int(time.time())}")


def test_three_machines_share_one_study_and_survive_a_killed_worker(tmp_path, study_url, mlflow_server):
    path = write_sweep(tmp_path, "shared", grid={"loss.alpha": [0.0, 0.5, 1.0]}, seeds=[0, 1],
                       set={"tracking.tracking_uri": mlflow_server, "trainer.max_steps": 40},
                       runner={"heartbeat_interval": 1, "grace_period": 6})
    cache = tmp_path / "cache"
    procs = []
    for machine in range(3):  # distinct PDL_WORKER_HOST: to each other they are other machines (heartbeats only)
        env = dict(os.environ, OMP_NUM_THREADS="1", PDL_WORKER_HOST=f"machine-{machine}")
        cmd = [sys.executable, "-m", "pd_lightning.cli", "sweep", "run", str(path), "--storage", study_url,
               "--cache", str(cache), "--out", str(tmp_path / "out"), "--threads", "1"]  # 3 "machines" on 2 cores
        procs.append(subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True))
    storage = optuna.storages.RDBStorage(study_url)

    def running_trial_of(machine: str):
        try:
            study = optuna.load_study(study_name="shared.default", storage=storage)
        except KeyError:
            return None
        for t in study.get_trials(states=(TrialState.RUNNING,)):
            if t.system_attrs.get("pdl.host") == machine and (
                    list((tmp_path / "out" / "trials" / t.user_attrs["pdl.task"] / "checkpoints").glob("*.ckpt"))):
                return t
        return None

    deadline = time.time() + 400
    victim = None
    while victim is None and time.time() < deadline:
        victim = running_trial_of("machine-0")
        time.sleep(0.5)
    assert victim is not None, "machine-0 never ran a trial"
    os.kill(int(victim.system_attrs["pdl.pid"]), signal.SIGKILL)  # machine-0's worker dies mid-trial
    outputs = [p.communicate(timeout=900)[0] for p in procs]
    assert procs[1].returncode == 0 and procs[2].returncode == 0, outputs[1][-3000:] + outputs[2][-3000:]
    assert procs[0].returncode == 1  # its worker died: that coordinator reports it, the others finish the sweep

    study = optuna.load_study(study_name="shared.default", storage=storage)
    complete = [t for t in study.trials if t.state == TrialState.COMPLETE]
    tasks = [t.user_attrs["pdl.task"] for t in complete]
    assert len(tasks) == 6 and len(set(tasks)) == 6
    stale = [t for t in study.trials if t.state == TrialState.FAIL]
    assert [t.number for t in stale] == [victim.number] and "pdl.error" not in stale[0].user_attrs
    assert victim.user_attrs["pdl.task"] in tasks  # re-run by another machine
    hosts = {t.system_attrs["pdl.host"] for t in complete}
    assert len(hosts) >= 2

    client = MlflowClient(tracking_uri=mlflow_server)
    exp = client.get_experiment_by_name("shared")
    runs = client.search_runs([exp.experiment_id], max_results=100)
    children = [r for r in runs if r.data.tags.get("pd.role") != "sweep"]
    parents = [r for r in runs if r.data.tags.get("pd.role") == "sweep"]
    assert len(parents) == 1
    assert sorted(r.data.tags["pd.task"] for r in children) == sorted(tasks)
    assert all(r.info.status == "FINISHED" and "eval.average" in r.data.metrics for r in children)
    assert {r.data.tags["mlflow.parentRunId"] for r in children} == {parents[0].info.run_id}
