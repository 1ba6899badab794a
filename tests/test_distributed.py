"""Scale-out with real components on CPU: 2-rank logit generation, 2-process DDP training (gloo),
an Optuna study on a PostgreSQL server shared by concurrent worker processes (with heartbeat-based
recovery of a SIGKILLed trial) and an MLflow tracking server with a PostgreSQL backend store."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import optuna
import pytest
import torch
from mlflow.tracking import MlflowClient
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.trial import TrialState
from transformers import AutoModelForCausalLM

from pd_lightning.config import load_config
from pd_lightning.logits.generate import generate_store
from pd_lightning.logits.store import LogitStore, load_manifest, verify_store
from pd_lightning.module import BatchStepSampler, SequentialBatchSampler

from conftest import TINY_DATA
from servers import STARTUP_TIMES

# One intra-op thread in every child: the same float reduction order as this process (conftest).
CHILD_ENV = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
HEARTBEAT_S, GRACE_S = 1, 3
# Optuna marks heartbeats, fail_stale_trials and the retry callback experimental; they are what we test.
pytestmark = pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")


# ------------------------------------------------------------------------------------------------ ranks


def test_ddp_ranks_split_each_global_batch_into_disjoint_shares():
    """Rank r of W takes the r-th block of B of the single-process stream's global batch of B·W, resumably."""
    for start in (0, 7):
        whole = list(itertools.islice(BatchStepSampler(1000, 8, seed=3, start_batch=start), 20))
        ranks = [list(itertools.islice(BatchStepSampler(1000, 4, seed=3, start_batch=start, rank=r, world_size=2), 20))
                 for r in range(2)]
        assert [a + b for a, b in zip(*ranks)] == whole
        assert not set(itertools.chain(*ranks[0])) & set(itertools.chain(*ranks[1]))  # 20 steps < one pass
    seq = [list(itertools.islice(SequentialBatchSampler(50, 3, start_batch=2, rank=r, world_size=2), 4)) for r in range(2)]
    assert [a + b for a, b in zip(*seq)] == list(itertools.islice(SequentialBatchSampler(50, 6, start_batch=2), 4))


@pytest.mark.parametrize("sampling", [(), ("logits.sampling=sample", "logits.samples=16")], ids=["topk", "sampled"])
def test_two_rank_generation_decodes_to_exactly_the_one_rank_store(tiny_teacher, small_data, tmp_path, sampling):
    def args(store: Path) -> list[str]:
        return ["tiny", *TINY_DATA, f"data.out={small_data}", "data.seq_len=32", f"teacher.out={tiny_teacher}",
                f"logits.store={store}", "logits.batch_size=16", "logits.sequences_per_shard=100", *sampling]

    one, two = tmp_path / "one", tmp_path / "two"
    generate_store(load_config(args(one)[0], args(one)[1:]))
    # torchrun, as `pdl logits generate --help` documents it: RANK/WORLD_SIZE in each rank's environment.
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           "-m", "pd_lightning.cli", "logits", "generate", *args(two)],
                          capture_output=True, text=True, env=CHILD_ENV, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    stats = {r: json.loads((two / f"generation_stats-rank{r}.json").read_text()) for r in range(2)}
    done = [stats[r].get("sequences_this_session", stats[r].get("sequences")) for r in range(2)]
    assert done == [650, 600]  # 12 shards of 100 + one of 50: rank 0 took the 7 even ones, rank 1 the 6 odd

    verify_store(two, deep=True)
    m1, m2 = load_manifest(one), load_manifest(two)
    assert [e["checksum"] for e in m2["shards"]] == [e["checksum"] for e in m1["shards"]]
    a, b = LogitStore(one), LogitStore(two)
    for first in range(0, len(a), 250):
        ids = list(range(first, min(first + 250, len(a))))
        x, y = a.sequences(ids), b.sequences(ids)
        for name in ("indices", "logprobs", "counts", "entropy", "logit_std") + (("draws",) if sampling else ()):
            assert torch.equal(getattr(x, name), getattr(y, name)), (name, first)


def test_ddp_training_with_two_cpu_processes_exports_a_loadable_model(tiny_data, tiny_store, tmp_path):
    out, uri = tmp_path / "ddp", f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = ["tiny", *TINY_DATA, f"data.out={tiny_data}", f"logits.store={tiny_store}", f"trainer.out={out}",
            f"tracking.tracking_uri={uri}", "tracking.experiment=ddp", "loss.alpha=0.9", "trainer.batch_size=8",
            "trainer.max_steps=6", "trainer.val_every_n_steps=3", "trainer.val_batches=1",
            "trainer.checkpoint_every_n_steps=3", "trainer.log_every_n_steps=1", "trainer.num_workers=0",
            "trainer.strategy=ddp", "trainer.devices=2", "trainer.accelerator=cpu"]
    # A real `pdl train` process: Lightning launches the second rank itself (gloo on CPU).
    proc = subprocess.run([sys.executable, "-m", "pd_lightning.cli", "train", *args], capture_output=True, text=True,
                          env=CHILD_ENV, timeout=600)
    logs = proc.stdout + proc.stderr
    assert proc.returncode == 0, logs[-4000:]
    assert "GLOBAL_RANK: 1, MEMBER: 2/2" in logs and "distributed_backend=gloo" in logs

    model = AutoModelForCausalLM.from_pretrained(out / "model", local_files_only=True)
    (ckpt,) = (out / "checkpoints").glob("*.ckpt")
    state = torch.load(ckpt, weights_only=True, map_location="cpu")
    assert state["global_step"] == 6
    for name, tensor in model.state_dict().items():
        assert torch.equal(state["state_dict"][f"model.{name}"], tensor), name  # the export is the last step
    info = json.loads((out / "model" / "pdl_run.json").read_text())
    assert info["tokens"] == 6 * 8 * 2 * 64  # steps x per-device batch x 2 ranks x seq_len
    assert np.isfinite(info["heldout_loss"])

    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("ddp").experiment_id])
    assert len(runs) == 1 and runs[0].info.run_id == info["run_id"]  # rank 1 opened no run of its own
    assert runs[0].info.status == "FINISHED" and "train/loss" in runs[0].data.metrics


# ------------------------------------------------------------------------------------------------ servers

WORKER = textwrap.dedent("""
    import os, sys, time
    import optuna
    from optuna.storages import RDBStorage

    url, name, n_trials, ready_dir, n_workers = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], int(sys.argv[5])
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = RDBStorage(url, heartbeat_interval={hb}, grace_period={grace})
    study = optuna.load_study(study_name=name, storage=storage)
    open(os.path.join(ready_dir, str(os.getpid())), "w").close()
    while len(os.listdir(ready_dir)) < n_workers:  # start together: the trials really overlap
        time.sleep(0.05)

    def objective(trial):
        x = trial.suggest_float("x", -10, 10)
        trial.set_user_attr("pid", os.getpid())
        trial.set_user_attr("start", time.time())
        if os.environ.get("PDL_TEST_DIE_IN_TRIAL"):
            time.sleep(2.5)  # two heartbeats reach the database, then the worker dies mid-trial
            os.kill(os.getpid(), 9)
        time.sleep(0.3)
        trial.set_user_attr("end", time.time())
        return (x - 2) ** 2

    study.optimize(objective, n_trials=n_trials)
""").format(hb=HEARTBEAT_S, grace=GRACE_S)


def _storage(url: str, **kwargs) -> RDBStorage:
    return RDBStorage(url, heartbeat_interval=HEARTBEAT_S, grace_period=GRACE_S, **kwargs)


def _workers(url: str, study: str, n_workers: int, n_trials: int, ready: Path, **env: str) -> list[subprocess.Popen]:
    ready.mkdir()
    return [subprocess.Popen([sys.executable, "-c", WORKER, url, study, str(n_trials), str(ready), str(n_workers)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=dict(CHILD_ENV, **env))
            for _ in range(n_workers)]


def test_optuna_study_on_postgres_is_shared_by_three_concurrent_worker_processes(postgres_url, tmp_path):
    assert postgres_url.startswith("postgresql+psycopg2://") and "@127.0.0.1:" in postgres_url
    optuna.create_study(study_name="three-workers", storage=_storage(postgres_url), direction="minimize")
    procs = _workers(postgres_url, "three-workers", 3, 4, tmp_path / "ready")
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-3000:]

    trials = optuna.load_study(study_name="three-workers", storage=_storage(postgres_url)).get_trials()
    assert sorted(t.number for t in trials) == list(range(12))
    assert all(t.state == TrialState.COMPLETE for t in trials)
    by_pid: dict[int, list] = {}
    for t in trials:
        by_pid.setdefault(t.user_attrs["pid"], []).append(t)
    assert sorted(len(v) for v in by_pid.values()) == [4, 4, 4]
    spans = {pid: (min(t.user_attrs["start"] for t in ts), max(t.user_attrs["end"] for t in ts)) for pid, ts in by_pid.items()}
    latest_start, earliest_end = max(s for s, _ in spans.values()), min(e for _, e in spans.values())
    assert latest_start < earliest_end, spans  # all three workers were inside the study at the same time


def test_heartbeat_fails_the_trial_of_a_sigkilled_worker_and_a_retry_completes_it(postgres_url, tmp_path):
    retry = RetryHeartbeatStaleTrialCallback(max_retry=1)
    study = optuna.create_study(study_name="killed-worker",
                                storage=_storage(postgres_url, heartbeat_stale_trial_callback=retry))
    (proc,) = _workers(postgres_url, "killed-worker", 1, 1, tmp_path / "ready", PDL_TEST_DIE_IN_TRIAL="1")
    proc.communicate(timeout=300)
    killed_at = time.time()
    assert proc.returncode == -9
    (trial,) = study.get_trials()
    assert trial.state == TrialState.RUNNING  # nobody finished it: only the heartbeat can tell it is dead

    optuna.storages.fail_stale_trials(study)
    if time.time() - killed_at < GRACE_S - HEARTBEAT_S - 0.5:  # checked within the grace period
        assert study.get_trials()[0].state == TrialState.RUNNING
    deadline = time.time() + 60
    while study.get_trials()[0].state == TrialState.RUNNING and time.time() < deadline:
        time.sleep(0.5)
        optuna.storages.fail_stale_trials(study)
    failed_after = time.time() - killed_at
    trials = study.get_trials()
    assert trials[0].state == TrialState.FAIL, trials
    assert failed_after >= GRACE_S - HEARTBEAT_S - 0.5, failed_after  # not before the grace period ran out

    # The retry callback enqueued the same parameters; the next worker runs them to completion.
    assert len(trials) == 2 and trials[1].state == TrialState.WAITING
    assert RetryHeartbeatStaleTrialCallback.retried_trial_number(trials[1]) == 0
    (proc,) = _workers(postgres_url, "killed-worker", 1, 1, tmp_path / "ready2")
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    done = study.get_trials()[1]
    assert done.state == TrialState.COMPLETE and done.params == trials[0].params


def test_mlflow_tracking_server_records_runs_in_postgres(mlflow_server, postgres_server):
    assert mlflow_server.startswith("http://127.0.0.1:")
    writer = MlflowClient(tracking_uri=mlflow_server)
    exp = writer.create_experiment("server-test")
    run = writer.create_run(exp, tags={"pd.kind": "kd"}, run_name="through-the-server")
    run_id = run.info.run_id
    writer.log_param(run_id, "loss.alpha", "0.9")
    for step in range(5):
        writer.log_metric(run_id, "train/loss", 5.0 - step, step=step)
    writer.log_text(run_id, "alpha: 0.9\n", "config.yaml")
    writer.set_terminated(run_id, "FINISHED")

    reader = MlflowClient(tracking_uri=mlflow_server)
    got = reader.get_run(run_id)
    assert got.info.status == "FINISHED" and got.info.run_name == "through-the-server"
    assert got.data.params == {"loss.alpha": "0.9"} and got.data.tags["pd.kind"] == "kd"
    assert [m.value for m in reader.get_metric_history(run_id, "train/loss")] == [5.0, 4.0, 3.0, 2.0, 1.0]
    assert [a.path for a in reader.list_artifacts(run_id)] == ["config.yaml"]
    assert Path(reader.download_artifacts(run_id, "config.yaml")).read_text() == "alpha: 0.9\n"
    # ... and the record lives in the server's PostgreSQL database, not in some local fallback store.
    conn = postgres_server.connect("mlflow")
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT status, name FROM runs WHERE run_uuid = %s", (run_id,))
            assert cur.fetchall() == [("FINISHED", "through-the-server")]
    finally:
        conn.close()


def _listening(port: int) -> set[str]:
    """Local addresses (hex, as in /proc/net/tcp*) of the sockets listening on `port`."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        if not os.path.exists(table):
            continue
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, _, hex_port = local.rpartition(":")
            if state == "0A" and int(hex_port, 16) == port:  # 0A: LISTEN
                found.add(address)
    return found


def test_server_fixtures_listen_on_loopback_only_and_start_in_bounded_time(postgres_server, mlflow_server):
    if not os.path.exists("/proc/net/tcp"):
        pytest.skip("no /proc/net/tcp to read listening sockets from")
    mlflow_port = int(mlflow_server.rsplit(":", 1)[1])
    for port in (postgres_server.port, mlflow_port):
        assert _listening(port) == {"0100007F"}, (port, _listening(port))  # 127.0.0.1, nothing on 0.0.0.0 or ::
    print("server start-up seconds:", {k: round(v, 2) for k, v in STARTUP_TIMES.items()})
    assert STARTUP_TIMES["postgres_server"] < 60 and STARTUP_TIMES["mlflow_server"] < 180
