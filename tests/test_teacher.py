"""A tiny teacher pre-trains on prepared shards, its held-out loss falls, and its HF export reloads exactly."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from pd_lightning.artifacts import TEACHER_INFO, teacher_digest
from pd_lightning.cli import main
from pd_lightning.config import load_config
from pd_lightning.data.shards import TokenShards, read_manifest
from pd_lightning.module import StepSampler, heldout_loss
from pd_lightning.train import online_store_identity



def test_teacher_learns_and_export_reloads_with_identical_logits(tiny_teacher, tiny_data):
    info = json.loads((tiny_teacher / TEACHER_INFO).read_text())
    assert info["heldout_loss_after"] < info["heldout_loss_before"] - 1.5  # from ~ln(512)=6.2 to well below
    model = AutoModelForCausalLM.from_pretrained(tiny_teacher, local_files_only=True)
    tok = AutoTokenizer.from_pretrained(tiny_teacher, local_files_only=True)
    assert len(tok) == read_manifest(tiny_data)["vocab_size"]
    assert heldout_loss(model, tiny_data) == pytest.approx(info["heldout_loss_after"], abs=1e-5)
    ids = torch.from_numpy(TokenShards(tiny_data, "heldout").batch([0, 1]))
    again = AutoModelForCausalLM.from_pretrained(tiny_teacher, local_files_only=True)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, again(input_ids=ids).logits)


def test_teacher_train_rerun_is_noop_and_refuses_foreign_dir(tiny_teacher, tiny_data, capsys, pdl_log, tmp_path):
    from conftest import TINY_DATA

    args = ["teacher", "train", "tiny", *TINY_DATA, f"data.out={tiny_data}", f"teacher.out={tiny_teacher}",
            "teacher.preset=tiny-1m", "teacher.max_steps=200", "teacher.batch_size=16", "teacher.lr=5e-3"]
    assert main(args) == 0
    assert "nothing to do" in pdl_log.text
    assert main([*args, "teacher.max_steps=201"]) == 2
    assert "different teacher" in capsys.readouterr().err


def test_step_sampler_is_a_pure_function_of_position():
    full = StepSampler(10, seed=3)
    it = iter(full)
    stream = [next(it) for _ in range(35)]
    assert sorted(stream[:10]) == list(range(10)) and sorted(stream[10:20]) == list(range(10))
    assert stream[:10] != stream[10:20]  # reshuffled each pass
    resumed = iter(StepSampler(10, seed=3, start=17))
    assert [next(resumed) for _ in range(18)] == stream[17:]


ONLINE = ["logits.mode=online_store", "logits.store=/s"]


@pytest.mark.parametrize("overrides, pinned", [([], "0306d1db75830f3f"), (ONLINE, "a128ae670f9043c3"),
                                               ([*ONLINE, "logits.method=wttm"], "a3761fc89c91a8f9")])
def test_teacher_identity_is_the_shared_digest_and_keeps_its_value(overrides, pinned):
    """A teacher's config hash is artifacts.teacher_digest (online-store settings as the extra), and its value is
    the one teachers trained before it was shared recorded: their TEACHER_INFO still matches, nothing retrains."""
    cfg = load_config("tiny", overrides)
    assert teacher_digest(cfg, "d0", online_store_identity(cfg.logits)) == pinned


def test_a_trained_teachers_info_records_the_shared_digest(tiny_teacher, tiny_data):
    from conftest import TINY_DATA

    cfg = load_config("tiny", [*TINY_DATA, f"data.out={tiny_data}", f"teacher.out={tiny_teacher}",
                               "teacher.preset=tiny-1m", "teacher.max_steps=200", "teacher.batch_size=16",
                               "teacher.lr=5e-3"])  # the tiny_teacher fixture's config
    info = json.loads((tiny_teacher / TEACHER_INFO).read_text())
    assert info["config_hash"] == teacher_digest(cfg, read_manifest(tiny_data)["config_hash"], None)
