"""Held-out token metrics (pd_lightning.metrics): hand-computed references on small arrays, the streaming
accumulator against the whole-array functions, and the one-pass held-out evaluation on a real model."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pd_lightning import metrics as M


def test_ece_equal_mass_matches_a_hand_computed_reference():
    conf = np.array([0.9, 0.8, 0.7, 0.6, 0.3, 0.2])
    correct = np.array([1, 1, 0, 1, 0, 0], dtype=bool)
    # 3 equal-mass bins of the sorted confidences: {0.2, 0.3} acc 0, {0.6, 0.7} acc 1/2, {0.8, 0.9} acc 1
    bins = M.reliability_bins(conf, correct, 3)
    assert [(round(b["conf"], 6), b["acc"], b["n"]) for b in bins] == [(0.25, 0.0, 2), (0.65, 0.5, 2), (0.85, 1.0, 2)]
    assert M.ece_equal_mass(conf, correct, 3) == pytest.approx((2 * 0.25 + 2 * 0.15 + 2 * 0.15) / 6)
    # N = 5, B = 2: edges ⌊b·5/2⌋ = 0, 2, 5 -> bins of 2 and 3 tokens
    bins = M.reliability_bins(np.array([0.1, 0.5, 0.4, 0.9, 0.2]), np.array([0, 1, 0, 1, 1], dtype=bool), 2)
    assert [b["n"] for b in bins] == [2, 3]
    assert bins[0]["conf"] == pytest.approx(0.15) and bins[0]["acc"] == pytest.approx(0.5)
    assert bins[1]["conf"] == pytest.approx(0.6) and bins[1]["acc"] == pytest.approx(2 / 3)
    # more bins than tokens: empty bins are skipped, each token is its own bin
    assert M.ece_equal_mass(np.array([0.3, 0.8]), np.array([True, False]), 15) == pytest.approx((0.7 + 0.8) / 2)
    # perfectly calibrated bins have ECE 0; an always-wrong confident model has ECE = its confidence
    assert M.ece_equal_mass(np.full(10, 0.5), np.array([1, 0] * 5, dtype=bool), 1) == 0.0
    assert M.ece_equal_mass(np.full(8, 0.9), np.zeros(8, dtype=bool), 4) == pytest.approx(0.9)
    with pytest.raises(ValueError, match="bins"):
        M.reliability_bins(conf, correct, 0)


def test_brier_agreement_and_kl_match_hand_computed_references():
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]], dtype=torch.float64)
    labels = torch.tensor([0, 1])
    # token 1: 0.3² + 0.2² + 0.1² = 0.14; token 2: 0.1² + 0.9² + 0.8² = 1.46
    assert M.brier_score(probs, labels) == pytest.approx(0.8)
    stats = M.token_stats(probs.log(), labels)
    assert (stats["sq_sum"] - 2 * stats["p_true"] + 1).mean().item() == pytest.approx(0.8)
    assert stats["nll"].tolist() == pytest.approx([-math.log(0.7), -math.log(0.1)])
    assert stats["confidence"].tolist() == pytest.approx([0.7, 0.8]) and stats["correct"].tolist() == [True, False]

    student = torch.tensor([[0.6, 0.4], [0.3, 0.7]], dtype=torch.float64).log()
    teacher = torch.tensor([[0.9, 0.1], [0.8, 0.2]], dtype=torch.float64).log()
    # KL(q ‖ p) per token: 0.9 ln(0.9/0.6) + 0.1 ln(0.1/0.4); 0.8 ln(0.8/0.3) + 0.2 ln(0.2/0.7)
    kl = [0.9 * math.log(1.5) + 0.1 * math.log(0.25), 0.8 * math.log(0.8 / 0.3) + 0.2 * math.log(0.2 / 0.7)]
    assert M.kl_teacher_student(student, teacher) == pytest.approx(sum(kl) / 2, rel=1e-6)
    assert M.top1_agreement(student, teacher) == 0.5  # both pick token 0 first, then 1 vs 0
    # a teacher that masks an entry (q = 0) contributes 0·log 0 = 0, not NaN
    masked = torch.tensor([[0.0, float("-inf"), 0.0]])
    got = M.teacher_token_stats(torch.tensor([[0.0, 0.0, 0.0]]), masked)["kl"].item()
    assert got == pytest.approx(math.log(3 / 2))  # q = (1/2, 0, 1/2), p uniform over 3


def test_streaming_accumulator_equals_the_whole_array_functions():
    gen = torch.Generator().manual_seed(0)
    V, N = 50, 1000
    z = torch.randn(N, V, generator=gen) * 3
    u = z + torch.randn(N, V, generator=gen)
    y = torch.randint(0, V, (N,), generator=gen)
    acc = M.TokenMetricAccumulator(bins=7, chunk=64)
    for lo in range(0, N, 300):  # uneven batches, chunks that do not divide them
        acc.update(z[lo:lo + 300], y[lo:lo + 300], u[lo:lo + 300])
    got = acc.result()
    p = z.double().softmax(-1)
    assert got.tokens == N
    assert got.loss == pytest.approx(F.cross_entropy(z.double(), y).item(), rel=1e-6)
    assert got.top1_acc == pytest.approx((z.argmax(-1) == y).double().mean().item())
    assert got.brier == pytest.approx(M.brier_score(p, y), rel=1e-5)
    ece = M.ece_equal_mass(p.max(-1).values.numpy(), (z.argmax(-1) == y).numpy(), 7)
    assert got.ece == pytest.approx(ece, abs=1e-6) and len(got.bins) == 7
    assert got.teacher_top1_agree == pytest.approx(M.top1_agreement(z, u))
    assert got.teacher_kl == pytest.approx(M.kl_teacher_student(z.double(), u.double()), rel=1e-5)
    assert set(got.mlflow_metrics()) == {f"eval.heldout.{k}" for k in M.HELDOUT_METRICS}
    no_teacher = M.TokenMetricAccumulator(bins=7)
    no_teacher.update(z, y)
    assert no_teacher.result().teacher_kl is None and "eval.heldout.teacher_kl" not in no_teacher.result().mlflow_metrics()
    with pytest.raises(ValueError, match="same vocabulary"):
        no_teacher.update(z, y, u[:, :10])


def test_heldout_metrics_one_pass_on_a_real_model(tiny_teacher: Path, tiny_data: Path):
    from transformers import AutoModelForCausalLM

    from pd_lightning.data.shards import TokenShards
    from pd_lightning.module import heldout_loss, heldout_metrics, lm_loss

    model = AutoModelForCausalLM.from_pretrained(tiny_teacher)
    model.config.use_cache = True  # as an exported dir has it (for generation)
    caches = []
    hook = model.register_forward_hook(lambda m, args, out: caches.append(out.past_key_values))
    got = heldout_metrics(model, tiny_data, teacher=model, max_sequences=40, batch_size=16)
    hook.remove()
    assert caches and all(c is None for c in caches)  # scoring builds no KV cache (it would never be read)
    ids = torch.from_numpy(TokenShards(tiny_data, "heldout").batch(range(40)))
    with torch.no_grad():
        reference = lm_loss(model(input_ids=ids).logits, ids).item()
    assert got.loss == pytest.approx(reference, rel=1e-5) == heldout_loss(model, tiny_data, max_sequences=40)
    assert got.tokens == 40 * 63
    assert got.teacher_top1_agree == 1.0 and abs(got.teacher_kl) < 1e-5  # the model against itself
    assert 0.0 < got.ece < 0.2 and 0.2 < got.top1_acc < 0.9 and 0.0 < got.brier < 1.0
