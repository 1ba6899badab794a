"""A tiny teacher pre-trains on prepared shards, its held-out loss falls, and its HF export reloads exactly."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from pd_lightning.cli import main
from pd_lightning.data.shards import TokenShards, read_manifest
from pd_lightning.module import StepSampler, heldout_loss
from pd_lightning.train import TEACHER_INFO


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


def test_teacher_train_rerun_is_noop_and_refuses_foreign_dir(tiny_teacher, tiny_data, capsys, tmp_path):
    from conftest import TINY_DATA

    args = ["teacher", "train", "tiny", *TINY_DATA, f"data.out={tiny_data}", f"teacher.out={tiny_teacher}",
            "teacher.preset=tiny-1m", "teacher.max_steps=200", "teacher.batch_size=16", "teacher.lr=5e-3"]
    assert main(args) == 0
    assert "nothing to do" in capsys.readouterr().out
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
