"""Truncation, temperature, derivation and adaptive temperatures against a dense float64 reference."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from pd_lightning.errors import ConfigError
from pd_lightning.logits.processing import (
    SparseLogits,
    adakd_temperature,
    apply_temperature,
    narrow,
    std_temperature,
    teacher_targets,
    truncate_top_p_k,
    wttm_exponents,
    wttm_transform,
)


def dense_reference(z: np.ndarray, p: float, k: int):
    """Per row, by the paper's words: sort τ=1 probs descending, smallest prefix reaching p, at most k."""
    out = []
    for row in z.astype(np.float64):
        log_z = np.log(np.sum(np.exp(row - row.max()))) + row.max()
        lp = row - log_z
        order = np.argsort(-row, kind="stable")  # by logit: ties after float rounding of lp stay ordered
        q = np.exp(lp[order])
        cum = np.cumsum(q)
        if p >= 1.0:  # by rule: every entry (a float sum reaches 1 early on peaked rows)
            n = len(q)
        else:
            n = int(np.searchsorted(cum >= p, True)) + 1 if np.any(cum >= p) else len(q)
        n = min(n, k)
        ent = -np.sum(np.exp(lp) * lp)
        out.append((order[:n], lp[order[:n]], ent, row.std(), cum))
    return out


def boundary_safe(cum: np.ndarray, p: float) -> bool:
    # A p within float32 noise of a cumulative sum has no single right answer (p = 1 is exact by rule).
    return p >= 1.0 or bool(np.min(np.abs(cum - p)) > 1e-4)


# peaked rows (one logit far above the rest, |z| up to 50) and p at or next to 1: where fp32
# log-probabilities z - logZ round the top-1 to exactly 0 and a running sum reaches 1 after one entry
peaked_rows = st.integers(min_value=2, max_value=40).flatmap(
    lambda v: st.lists(
        st.tuples(st.floats(20, 50, width=32),
                  st.lists(st.floats(-50, 10, allow_nan=False, width=32), min_size=v - 1, max_size=v - 1, unique=True)),
        min_size=1, max_size=6,
    )
)


logit_rows = st.integers(min_value=2, max_value=40).flatmap(
    lambda v: st.lists(
        st.lists(st.floats(-12, 12, allow_nan=False, width=32), min_size=v, max_size=v, unique=True),
        min_size=1,
        max_size=6,
    )
)


@settings(max_examples=150, deadline=None)
@given(rows=logit_rows, p=st.floats(0.05, 1.0), k=st.integers(1, 50))
def test_truncation_matches_dense_reference(rows, p, k):
    z = np.array(rows, dtype=np.float32)
    ref = dense_reference(z, p, k)
    for r in ref:
        assume(boundary_safe(r[4], p))
    s = truncate_top_p_k(torch.from_numpy(z), p, k)
    assert s.width == min(k, z.shape[1])
    for i, (idx, lp, ent, std, _) in enumerate(ref):
        n = len(idx)
        assert int(s.counts[i]) == n
        assert s.indices[i, :n].tolist() == idx.tolist()
        np.testing.assert_allclose(s.logprobs[i, :n].numpy(), lp, rtol=1e-5, atol=1e-5)
        assert torch.all(torch.isneginf(s.logprobs[i, n:])) and torch.all(s.indices[i, n:] == 0)
        assert abs(float(s.entropy[i]) - ent) < 1e-4 * max(1.0, ent)
        assert abs(float(s.logit_std[i]) - std) < 1e-4


@settings(max_examples=150, deadline=None)
@given(rows=peaked_rows, p=st.sampled_from([0.9, 0.999, 1.0]), k=st.integers(1, 50))
def test_truncation_of_peaked_rows_matches_dense_reference(rows, p, k):
    z = np.array([[top] + rest for top, rest in rows], dtype=np.float32)
    assume(all(len(set(r.tolist())) == len(r) for r in z))
    ref = dense_reference(z, p, k)
    for r in ref:
        assume(boundary_safe(r[4], p))
    s = truncate_top_p_k(torch.from_numpy(z), p, k)
    for i, (idx, lp, ent, std, _) in enumerate(ref):
        n = len(idx)
        assert int(s.counts[i]) == n
        assert s.indices[i, :n].tolist() == idx.tolist()
        # relative precision on the top-1 too: its log-probability is -log1p(R), not a rounded 0
        np.testing.assert_allclose(s.logprobs[i, :n].numpy(), lp, rtol=1e-5, atol=1e-6)
        assert abs(float(s.logit_std[i]) - std) <= 1e-5 * std + 1e-6
        assert abs(float(s.entropy[i]) - ent) <= 1e-4 * ent + 1e-6


def test_top_1_k_keeps_k_entries_on_a_confident_token():
    z = torch.randn(1, 5000, generator=torch.Generator().manual_seed(0))
    z[0, 0] = 25.0
    s = truncate_top_p_k(z, 1.0, 100)
    assert int(s.counts[0]) == 100  # was 1: the fp32 top-1 log-probability rounded to 0.0
    ref = torch.log_softmax(z.double(), -1)[0].sort(descending=True).values[:100]
    np.testing.assert_allclose(s.logprobs[0].double().numpy(), ref.numpy(), rtol=1e-6, atol=0)
    # tempering brings the tail back: at τ = 5 the dropped entries held most of the target's mass
    probs = apply_temperature(s.logprobs, 5.0)[0]
    assert float(probs[1:].sum()) > 0.5
    # narrowing a p = 1 store keeps every stored entry, however confident the token
    assert int(narrow(s, 1.0, 60, store_p=1.0, store_k=100).counts[0]) == 60
    # masked (padded) vocabulary entries are never kept, even at p = 1
    zm = z.clone()
    zm[0, 50:] = -math.inf
    sm = truncate_top_p_k(zm, 1.0, 100)
    assert int(sm.counts[0]) == 50 and bool(torch.isfinite(sm.entropy).all())


def test_logit_std_two_pass_on_peaked_rows():
    # one logit 40 above a narrow bulk: the one-pass E[d²] - E[d]² of d = z - max cancels ~1600 against ~1600
    g = torch.Generator().manual_seed(3)
    z = torch.randn(8, 5000, generator=g) * 0.05
    z[:, 7] = 40.0
    ref = z.double().std(-1, correction=0)
    got = truncate_top_p_k(z, 0.95, 10).logit_std.double()
    rel = ((got - ref).abs() / ref).max().item()
    assert rel < 2e-6, rel  # the one-pass form was off by ~1e-4 here


@settings(max_examples=150, deadline=None)
@given(
    rows=logit_rows,
    p=st.floats(0.3, 1.0),
    k=st.integers(1, 40),
    dp=st.floats(0.0, 1.0),
    dk=st.floats(0.0, 1.0),
    tau=st.floats(0.25, 4.0),
)
def test_narrow_and_temperature_equal_dense(rows, p, k, dp, dk, tau):
    z = np.array(rows, dtype=np.float32)
    p2, k2 = max(0.05, p * dp), max(1, int(round(k * dk)))
    for r in dense_reference(z, p, k) + dense_reference(z, p2, k2):
        assume(boundary_safe(r[4], p) and boundary_safe(r[4], p2))
    stored = truncate_top_p_k(torch.from_numpy(z), p, k)
    derived = narrow(stored, p2, k2, store_p=p, store_k=k)
    direct = truncate_top_p_k(torch.from_numpy(z), p2, k2)
    assert torch.equal(derived.counts, direct.counts)
    w = direct.width
    assert torch.equal(derived.indices[:, :w], direct.indices)
    assert torch.equal(derived.logprobs[:, :w], direct.logprobs)
    # τ on the support: softmax(Truncate(z)/τ) from raw logits, dense float64
    probs = apply_temperature(derived.logprobs, tau).numpy()
    for i, (idx, _, _, _, _) in enumerate(dense_reference(z, p2, k2)):
        zz = z[i, idx].astype(np.float64) / tau
        ref = np.exp(zz - zz.max())
        ref /= ref.sum()
        np.testing.assert_allclose(probs[i, : len(idx)], ref, rtol=1e-4, atol=1e-6)
        assert np.all(probs[i, len(idx) :] == 0)


def test_per_token_tau_and_wttm():
    z = torch.randn(5, 30) * 3
    s = truncate_top_p_k(z, 0.99, 10)
    tau = torch.tensor([0.5, 1.0, 2.0, 3.0, 1.5])
    probs = apply_temperature(s.logprobs, tau)
    for i in range(5):
        np.testing.assert_allclose(probs[i], apply_temperature(s.logprobs[i : i + 1], float(tau[i]))[0], atol=1e-6)
    q_t, u = wttm_transform(s.logprobs, 0.5)
    q = torch.softmax(s.logprobs, -1)
    ref_u = (q**0.5).sum(-1)
    torch.testing.assert_close(u, ref_u)
    torch.testing.assert_close(q_t, q**0.5 / ref_u[:, None])
    assert torch.all(q_t[torch.isneginf(s.logprobs)] == 0)


def test_normkd_and_adakd_temperatures():
    z = torch.randn(64, 200) * torch.linspace(0.5, 5, 64)[:, None]
    s = truncate_top_p_k(z, 0.95, 50)
    torch.testing.assert_close(std_temperature(s.logit_std, 1.5), 1.5 * z.std(-1, correction=0), rtol=1e-5, atol=1e-5)
    t = teacher_targets(s, 0.95, 50, method="NormKD", t_norm=2.0)
    tau_t = 2.0 * z.std(-1, correction=0)
    torch.testing.assert_close(t.token_weights, tau_t**2, rtol=2e-5, atol=1e-5)
    ref = torch.softmax(torch.where(torch.isneginf(s.logprobs), -math.inf, s.logprobs) / tau_t[:, None], -1)
    torch.testing.assert_close(t.probs, ref)
    sd = adakd_temperature(s.logit_std, "sd", tau=2.0, beta=1.0, tau_min=0.1, tau_max=100)
    torch.testing.assert_close(sd, 2.0 * s.logit_std / s.logit_std.mean())
    h = adakd_temperature(s.entropy, "h", tau=1.0, reference=2.0)
    torch.testing.assert_close(h, (2.0 / s.entropy).clamp(0.5, 2.0))
    # sharp tokens (large std, low entropy) get hotter
    assert sd[-1] > sd[0] and h[-1] >= h[0]
    t2 = teacher_targets(s, 0.9, 20, tau=1.0, method="adakd-h", reference=2.0)
    assert t2.probs.shape == (64, 20) and t2.token_weights is None
    torch.testing.assert_close(t2.probs.sum(-1), torch.ones(64))


def dense_wttm_weight(z: torch.Tensor, gamma: float, tau: float) -> torch.Tensor:
    """WTTM's U (Zheng & Yang 2024, official code): Σ over the whole vocabulary of softmax(z/τ)^γ, float64."""
    return (torch.softmax(z.double() / tau, -1) ** gamma).sum(-1)


@pytest.mark.parametrize("gamma,tau", [(0.5, 1.0), (0.2, 1.0), (0.5, 2.0), (1.5, 0.5)])
def test_wttm_weight_sums_over_the_whole_vocabulary(gamma, tau):
    z = llm_rows(64, 400, seed=5)
    exps = wttm_exponents(gamma, tau)
    s = truncate_top_p_k(z, 0.9, 20, power_exponents=exps)
    t = teacher_targets(s, 0.9, 20, tau=tau, method="wttm", store_p=0.9, store_k=20, gamma=gamma)
    ref = dense_wttm_weight(z, gamma, tau)
    np.testing.assert_allclose(t.token_weights.double().numpy(), ref.numpy(), rtol=2e-5)
    # the support variant (named, a departure) is what the lab used to compute: 1 for one kept entry
    t_s = teacher_targets(s, 0.9, 20, tau=tau, method="wttm", store_p=0.9, store_k=20, gamma=gamma, weight="support")
    one = s.counts == 1
    assert bool(one.any()) and torch.allclose(t_s.token_weights[one], torch.ones(int(one.sum())))
    ratio = (ref / t_s.token_weights.double()).numpy()
    assert ratio.max() / ratio.min() > 2  # not a common scale: the tokens' relative weights change
    # the targets themselves are the same (q^γ renormalised on the support)
    torch.testing.assert_close(t.probs, t_s.probs)


def test_wttm_refuses_a_store_without_its_power_sums():
    s = truncate_top_p_k(llm_rows(4, 100, seed=1), 0.95, 30, power_exponents=(0.5,))
    teacher_targets(s, 0.9, 20, method="wttm", store_p=0.95, store_k=30, gamma=0.5)
    with pytest.raises(ConfigError, match=r"log Σ q\^0.3 .*store_power_exponents=\[0.3\].*wttm_weight=support"):
        teacher_targets(s, 0.9, 20, method="wttm", store_p=0.95, store_k=30, gamma=0.3)
    with pytest.raises(ConfigError, match="logits.wttm_weight"):
        teacher_targets(s, 0.9, 20, method="wttm", store_p=0.95, store_k=30, weight="vocab")


def llm_rows(n: int, vocab: int, seed: int) -> torch.Tensor:
    """Rows from peaked to flat: Gumbel noise + Zipfian popularity, per-row sharpness."""
    g = torch.Generator().manual_seed(seed)
    gumbel = -torch.log(-torch.log(torch.rand(n, vocab, generator=g).clamp(1e-12, 1 - 1e-7)))
    base = -1.1 * torch.log(torch.arange(1, vocab + 1, dtype=torch.float32))
    return torch.exp(torch.randn(n, 1, generator=g) * 0.8 + math.log(2.0)) * (gumbel + base)


def test_teacher_targets_rows_sum_to_one_and_errors():
    s = truncate_top_p_k(torch.randn(8, 100) * 2, 0.95, 30, power_exponents=wttm_exponents(0.5, 2.0))
    for method in ("none", "wttm", "adakd_sd"):
        t = teacher_targets(s, 0.9, 20, tau=2.0, method=method, store_p=0.95, store_k=30)
        torch.testing.assert_close(t.probs.sum(-1), torch.ones(8))
        assert t.indices.shape == t.probs.shape == (8, 20)
    with pytest.raises(ConfigError, match="logits.method"):
        teacher_targets(s, 0.9, 20, method="normdk")
    with pytest.raises(ConfigError, match="k <= 30"):
        teacher_targets(s, 0.9, 40, store_p=0.95, store_k=30)
    with pytest.raises(ConfigError, match="p <= 0.95"):
        teacher_targets(s, 0.99, 20, store_p=0.95, store_k=30)
    with pytest.raises(ConfigError, match="tau"):
        teacher_targets(s, 0.9, 20, tau=2.0, method="normkd")
    with pytest.raises(ConfigError, match="gamma"):
        teacher_targets(s, 0.9, 20, method="wttm", gamm=0.5)


def test_masked_logits_and_chunking():
    z = torch.randn(10, 50)
    z[:, 40:] = -math.inf  # padded vocabulary rows must not poison entropy/std handling
    s = truncate_top_p_k(z, 0.9, 8, chunk_tokens=3)
    assert torch.isfinite(s.entropy).all()
    ref = truncate_top_p_k(z[:, :40], 0.9, 8)
    assert torch.equal(s.indices, ref.indices) and torch.equal(s.counts, ref.counts)
    torch.testing.assert_close(s.entropy, ref.entropy)
    torch.testing.assert_close(s.logit_std, ref.logit_std)
    assert isinstance(SparseLogits.cat([s.rows(0, 2), s.rows(2, 10)]), SparseLogits)
