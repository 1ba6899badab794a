"""Online logits (the paper's Table 6): a store written while the teacher pre-trains, and co-training."""

from __future__ import annotations

import numpy as np
import torch
from mlflow.tracking import MlflowClient
from transformers import AutoModelForCausalLM

from pd_lightning.config import load_config
from pd_lightning.data.shards import TokenShards
from pd_lightning.logits.store import LogitStore, load_manifest, verify_store
from pd_lightning.module import BatchStepSampler, DistillationDataModule
from pd_lightning.plan import SEQUENCE_MAP
from pd_lightning.train import train, train_teacher

from conftest import TINY_DATA


def test_online_store_holds_the_teachers_late_batches_and_a_student_trains_on_them(tiny_data, tmp_path):
    store = tmp_path / "online"
    teacher_cfg = load_config("tiny", [*TINY_DATA, f"data.out={tiny_data}", f"teacher.out={tmp_path / 'teacher'}",
                                       "teacher.preset=tiny-1m", "teacher.max_steps=40", "teacher.batch_size=8",
                                       "teacher.lr=5e-3", "logits.mode=online_store", "logits.online_start_frac=0.75",
                                       f"logits.store={store}", "logits.sequences_per_shard=32"])
    train_teacher(teacher_cfg)
    m = load_manifest(store)
    assert m["num_sequences"] == 10 * 8 and m["meta"]["online"] is True and m["meta"]["teacher_steps"] == [30, 40]
    verify_store(store, deep=True)
    seq_map = np.load(store / SEQUENCE_MAP, allow_pickle=False)
    stream = iter(BatchStepSampler(len(TokenShards(tiny_data, "train")), 8, seed=0, start_batch=30))
    assert seq_map.tolist() == [i for _ in range(10) for i in next(stream)]  # the teacher's steps 30..39, in order
    # The stored top entry of the last batch is the finished teacher's argmax at most positions: those
    # logits come from the last steps of its training.
    final = AutoModelForCausalLM.from_pretrained(tmp_path / "teacher", local_files_only=True)
    ids = torch.from_numpy(TokenShards(tiny_data, "train").batch(seq_map[-8:]))
    with torch.no_grad():
        argmax = final(input_ids=ids).logits[:, :-1].argmax(-1).reshape(-1)
    stored = LogitStore(store).sequences(list(range(72, 80))).indices[:, 0]
    assert (stored == argmax).float().mean() > 0.8

    # A student replays exactly those batches, in the teacher's order.
    dm = DistillationDataModule(tiny_data, 8, seed=5, store_root=store, sequence_map=seq_map)
    dm.trainer = None
    first = next(iter(dm.train_dataloader()))
    assert torch.equal(first["input_ids"], torch.from_numpy(TokenShards(tiny_data, "train").batch(seq_map[:8])))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    summary = train(load_config("tiny", [*TINY_DATA, f"data.out={tiny_data}", f"logits.store={store}",
                                         "logits.mode=online_store", "loss.alpha=0.1", "trainer.max_steps=15",
                                         "trainer.batch_size=8", f"trainer.out={tmp_path / 'student'}",
                                         f"tracking.tracking_uri={uri}", "trainer.val_every_n_steps=15"]))
    run = MlflowClient(uri).get_run(summary["run_id"])
    assert run.info.status == "FINISHED" and run.data.tags["pd.logits_mode"] == "online_store"


def test_cotraining_trains_teacher_and_student_together(tiny_data, tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = load_config("tiny", [*TINY_DATA, f"data.out={tiny_data}", "logits.mode=cotrain", "loss.alpha=0.5",
                               "teacher.preset=tiny-1m", "teacher.lr=5e-3", "trainer.max_steps=25",
                               "trainer.batch_size=8", "trainer.val_every_n_steps=25", "trainer.log_every_n_steps=2",
                               f"trainer.out={tmp_path / 'run'}", f"tracking.tracking_uri={uri}"])
    summary = train(cfg)
    client = MlflowClient(uri)
    teacher_losses = [m.value for m in client.get_metric_history(summary["run_id"], "teacher/loss")]
    assert len(teacher_losses) >= 3 and teacher_losses[-1] < teacher_losses[0] - 0.5  # the teacher learns
    kd = [m.value for m in client.get_metric_history(summary["run_id"], "train/kd_loss")]
    assert all(v > 0 for v in kd)
    assert (tmp_path / "run" / "teacher" / "config.json").is_file()
    run = client.get_run(summary["run_id"])
    assert run.data.tags["pd.teacher"] == "cotrain:tiny-1m"
    # held-out agreement is measured against the teacher trained in the same run
    assert run.data.tags["eval.heldout.teacher"] == "cotrain:tiny-1m" and run.data.metrics["eval.heldout.teacher_kl"] > 0
