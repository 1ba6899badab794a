"""Sparse distillation losses against dense, row-by-row reference implementations (float64)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import example, given, settings
from hypothesis import strategies as st

from pd_lightning.errors import ConfigError
from pd_lightning.logits.processing import logit_std, std_temperature
from pd_lightning.losses import KD_NORMS, LOSS_KINDS, auto_chunk_size, distillation_loss

F64 = torch.float64
SETTINGS = settings(max_examples=60, deadline=None, derandomize=True)


def dense_reference(z, labels, idx, q, *, alpha, kind, tau=None, weights=None, tau_sq=None, kd_norm="tokens",
                    beta=0.5):
    """Textbook formulas on a dense teacher tensor, one row at a time (independent of the library's masking)."""
    n, v = z.shape
    valid = labels != -100
    lm = F.cross_entropy(z, labels, ignore_index=-100)
    u = z if tau is None else z / (tau if not torch.is_tensor(tau) else tau.reshape(-1, 1))
    logp = torch.log_softmax(u, -1)
    p = logp.exp()
    qd = torch.zeros(n, v, dtype=z.dtype).scatter(1, idx.clamp_min(0), q)
    ds = []
    for r in range(n):
        s = torch.nonzero(qd[r] > 0).flatten()
        qs = qd[r, s]
        if kind == "nll":
            d = -(qs * logp[r, s]).sum()
        elif kind == "kld":
            d = (qs * (qs.log() - logp[r, s])).sum()
        elif kind == "mse":
            d = ((qd[r] - p[r]) ** 2).sum()
        elif kind == "tvd":
            d = 0.5 * (qd[r] - p[r]).abs().sum()
        elif len(s) == 0:
            d = z.new_zeros(())
        else:
            pt = torch.softmax(u[r, s], -1)  # student renormalised on the support
            if kind == "rkl":
                d = (pt * (pt.log() - qs.log())).sum()
            else:
                m = beta * qs + (1 - beta) * pt
                d = beta * (qs * (qs / m).log()).sum() + (1 - beta) * (pt * (pt / m).log()).sum()
        ds.append(d)
    d = torch.stack(ds)
    w = valid.to(z.dtype) * (1.0 if weights is None else weights)
    num = w * d * (1.0 if tau_sq is None else torch.as_tensor(tau_sq, dtype=z.dtype) ** 2)
    kd = num.sum() / (valid.sum() if kd_norm == "tokens" else w.sum())
    return (1 - alpha) * lm + alpha * kd, lm, kd


def make_case(seed, n, v, k, pad, ignored, dtype=F64):
    """Random logits, labels (some ignored, at least one not), distinct support indices, q with `pad` zeros."""
    g = torch.Generator().manual_seed(seed)
    z = (torch.randn(n, v, generator=g, dtype=F64) * 2).to(dtype)
    labels = torch.randint(0, v, (n,), generator=g)
    labels[1:][torch.rand(n - 1, generator=g) < ignored] = -100
    idx = torch.stack([torch.randperm(v, generator=g)[:k] for _ in range(n)])
    q = torch.rand(n, k, generator=g, dtype=F64) + 0.05
    if pad:  # the last `pad` slots are padding (q = 0), always leaving at least one real entry
        q[:, k - min(pad, k - 1):] = 0.0
    q = q / q.sum(-1, keepdim=True)
    return z, labels, idx, q


case = st.tuples(
    st.integers(0, 2**31 - 1),  # seed
    st.integers(1, 6),  # tokens
    st.integers(2, 12),  # vocab
)


@SETTINGS
@given(c=case, kind=st.sampled_from(LOSS_KINDS), kfrac=st.floats(0, 1), pad=st.integers(0, 3),
       alpha=st.sampled_from([0.1, 0.5, 0.9, 1.0]), tau_mode=st.sampled_from(["none", "scalar", "tensor"]),
       use_w=st.booleans(), tau_sq=st.sampled_from([None, 2.0, "tensor"]), kd_norm=st.sampled_from(KD_NORMS),
       chunk=st.integers(1, 7), beta=st.floats(0.1, 0.9))
@example(c=(1, 4, 9), kind="jsd", kfrac=0.0, pad=0, alpha=0.9, tau_mode="none", use_w=False, tau_sq=None,
         kd_norm="tokens", chunk=2, beta=0.5).via("support of size 1")
@example(c=(2, 4, 9), kind="rkl", kfrac=1.0, pad=0, alpha=0.9, tau_mode="none", use_w=False, tau_sq=None,
         kd_norm="tokens", chunk=2, beta=0.5).via("support = full vocabulary")
def test_matches_dense_reference(c, kind, kfrac, pad, alpha, tau_mode, use_w, tau_sq, kd_norm, chunk, beta):
    seed, n, v = c[:3]
    k = 1 + round(kfrac * (v - 1))
    z, labels, idx, q = make_case(seed, n, v, k, pad, ignored=0.3)
    g = torch.Generator().manual_seed(seed + 1)
    tau = {"none": None, "scalar": 0.7, "tensor": torch.rand(n, generator=g, dtype=F64) * 2 + 0.3}[tau_mode]
    w = torch.rand(n, generator=g, dtype=F64) if use_w else None
    tsq = torch.rand(n, generator=g, dtype=F64) + 0.5 if tau_sq == "tensor" else tau_sq
    z.requires_grad_()
    out = distillation_loss(z, labels, idx, q, alpha=alpha, kind=kind, chunk_size=chunk, student_tau=tau,
                            token_weights=w, tau_sq_scale=tsq, kd_norm=kd_norm, jsd_beta=beta)
    ref = dense_reference(z, labels, idx, q, alpha=alpha, kind=kind, tau=tau, weights=w, tau_sq=tsq,
                          kd_norm=kd_norm, beta=beta)
    torch.testing.assert_close(out.loss, ref[0], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(out.lm_loss, ref[1].detach(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(out.kd_loss, ref[2].detach(), rtol=1e-10, atol=1e-12)
    (g_ours,) = torch.autograd.grad(out.loss, z)
    (g_ref,) = torch.autograd.grad(ref[0], z)
    torch.testing.assert_close(g_ours, g_ref, rtol=1e-9, atol=1e-12)
    assert not out.lm_loss.requires_grad and not out.kd_loss.requires_grad


@pytest.mark.parametrize("kind", LOSS_KINDS)
@pytest.mark.parametrize("k", [1, 11])
def test_support_of_size_one_and_full_vocabulary(kind, k):
    z, labels, idx, q = make_case(3, 5, 11, k, pad=0, ignored=0.0)
    z.requires_grad_()
    out = distillation_loss(z, labels, idx, q, alpha=1.0, kind=kind)
    ref = dense_reference(z, labels, idx, q, alpha=1.0, kind=kind)
    torch.testing.assert_close(out.loss, ref[0], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(torch.autograd.grad(out.loss, z)[0], torch.autograd.grad(ref[0], z)[0])


def test_full_support_rkl_and_tvd_are_the_textbook_ones():
    z, labels, idx, q = make_case(4, 3, 7, 7, pad=0, ignored=0.0)
    p = torch.softmax(z, -1)
    qd = torch.zeros_like(z).scatter(1, idx, q)
    rkl = distillation_loss(z, labels, idx, q, alpha=1.0, kind="rkl").loss
    tvd = distillation_loss(z, labels, idx, q, alpha=1.0, kind="tvd").loss
    torch.testing.assert_close(rkl, (p * (p.log() - qd.log())).sum(-1).mean())
    torch.testing.assert_close(tvd, 0.5 * (p - qd).abs().sum(-1).mean())


def test_tvd_counts_off_support_mass():
    z = torch.zeros(1, 4, dtype=F64)  # p = 1/4 everywhere
    idx, q = torch.tensor([[0]]), torch.tensor([[1.0]], dtype=F64)
    out = distillation_loss(z, torch.tensor([0]), idx, q, alpha=1.0, kind="tvd")
    assert out.loss.item() == pytest.approx(0.5 * (0.75 + 0.75))


@SETTINGS
@given(c=case, kfrac=st.floats(0, 1), pad=st.integers(0, 3), tau=st.sampled_from([None, 0.5, 2.0]))
def test_nll_and_kld_give_identical_student_gradients(c, kfrac, pad, tau):
    seed, n, v = c[:3]
    z, labels, idx, q = make_case(seed, n, v, 1 + round(kfrac * (v - 1)), pad, ignored=0.2)
    z.requires_grad_()
    g = [torch.autograd.grad(distillation_loss(z, labels, idx, q, alpha=0.7, kind=kd, student_tau=tau).loss, z)[0]
         for kd in ("nll", "kld")]
    torch.testing.assert_close(g[0], g[1], rtol=1e-12, atol=1e-14)


@SETTINGS
@given(c=case, kind=st.sampled_from(LOSS_KINDS), chunk=st.integers(1, 5), tau=st.sampled_from([None, 1.5]))
def test_chunked_equals_unchunked(c, kind, chunk, tau):
    seed, n, v = c[:3]
    z, labels, idx, q = make_case(seed, n, v, max(1, v // 2), pad=1, ignored=0.2)
    z.requires_grad_()
    outs = [distillation_loss(z, labels, idx, q, alpha=0.8, kind=kind, chunk_size=cs, student_tau=tau)
            for cs in (chunk, n)]
    torch.testing.assert_close(outs[0].loss, outs[1].loss, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(torch.autograd.grad(outs[0].loss, z)[0], torch.autograd.grad(outs[1].loss, z)[0],
                               rtol=1e-12, atol=1e-14)


@SETTINGS
@given(c=case, kind=st.sampled_from(LOSS_KINDS), alpha=st.sampled_from([0.0, 0.3, 1.0]), chunk=st.integers(1, 5),
       hdim=st.integers(1, 6), tau=st.sampled_from([None, 0.8]))
def test_fused_equals_unfused(c, kind, alpha, chunk, hdim, tau):
    seed, n, v = c[:3]
    _, labels, idx, q = make_case(seed, n, v, max(1, v // 3), pad=1, ignored=0.2)
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, hdim, generator=g, dtype=F64, requires_grad=True)
    w = torch.randn(v, hdim, generator=g, dtype=F64, requires_grad=True)
    kw = dict(alpha=alpha, kind=kind, chunk_size=chunk, student_tau=tau)
    fused = distillation_loss(None, labels, idx, q, hidden=h, lm_head_weight=w, fused=True, **kw)
    plain = distillation_loss(h @ w.t(), labels, idx, q, **kw)
    torch.testing.assert_close(fused.loss, plain.loss, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(fused.kd_loss, plain.kd_loss, rtol=1e-10, atol=1e-12)
    for a, b in zip(torch.autograd.grad(fused.loss, (h, w)), torch.autograd.grad(plain.loss, (h, w))):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, F64])
def test_alpha_zero_is_exactly_cross_entropy_and_skips_teacher(dtype):
    z, labels, _, _ = make_case(5, 9, 17, 3, pad=0, ignored=0.3, dtype=dtype)
    z.requires_grad_()
    out = distillation_loss(z, labels, None, None, alpha=0.0, kind="mse")
    ref = F.cross_entropy(z, labels, ignore_index=-100)
    assert torch.equal(out.loss, ref) and out.kd_loss.item() == 0.0
    assert torch.equal(torch.autograd.grad(out.loss, z)[0], torch.autograd.grad(ref, z)[0])


def test_alpha_zero_fused_matches_cross_entropy():
    _, labels, _, _ = make_case(6, 9, 17, 3, pad=0, ignored=0.3)
    h = torch.randn(9, 4, dtype=F64, requires_grad=True)
    w = torch.randn(17, 4, dtype=F64, requires_grad=True)
    out = distillation_loss(None, labels, None, None, alpha=0.0, hidden=h, lm_head_weight=w, fused=True, chunk_size=2)
    ref = F.cross_entropy(h @ w.t(), labels, ignore_index=-100)
    torch.testing.assert_close(out.loss, ref, rtol=1e-12, atol=0)
    for a, b in zip(torch.autograd.grad(out.loss, (h, w)), torch.autograd.grad(ref, (h, w))):
        torch.testing.assert_close(a, b)


def test_tau_sq_scale_multiplies_kd_by_tau_squared_per_token():
    z, labels, idx, q = make_case(7, 6, 10, 4, pad=1, ignored=0.0)
    base = distillation_loss(z, labels, idx, q, alpha=1.0, kind="kld").kd_loss
    assert distillation_loss(z, labels, idx, q, alpha=1.0, kind="kld", tau_sq_scale=3.0).kd_loss.item() == \
        pytest.approx(9.0 * base.item(), rel=1e-12)
    tau = torch.tensor([1.0, 2.0, 1.0, 1.0, 0.5, 1.0], dtype=F64)
    per_tok = torch.stack([distillation_loss(z[i:i + 1], labels[i:i + 1], idx[i:i + 1], q[i:i + 1], alpha=1.0,
                                             kind="kld").kd_loss for i in range(6)])
    scaled = distillation_loss(z, labels, idx, q, alpha=1.0, kind="kld", tau_sq_scale=tau).kd_loss
    torch.testing.assert_close(scaled, (per_tok * tau**2).mean())


def test_token_weights_normalisation():
    z, labels, idx, q = make_case(8, 6, 10, 4, pad=1, ignored=0.0)
    labels[5] = -100
    per_tok = torch.stack([distillation_loss(z[i:i + 1], labels[i:i + 1].clamp_min(0), idx[i:i + 1], q[i:i + 1],
                                             alpha=1.0, kind="nll").kd_loss for i in range(6)])
    w = torch.tensor([0.5, 2.0, 0.0, 1.0, 1.0, 7.0], dtype=F64)  # the ignored token's weight must not matter
    tok = distillation_loss(z, labels, idx, q, alpha=1.0, kind="nll", token_weights=w).kd_loss
    torch.testing.assert_close(tok, (w * per_tok)[:5].sum() / 5)  # "tokens": Σ w D / #valid (WTTM's mean(U·KL))
    wts = distillation_loss(z, labels, idx, q, alpha=1.0, kind="nll", token_weights=w, kd_norm="weights").kd_loss
    torch.testing.assert_close(wts, (w * per_tok)[:5].sum() / w[:5].sum())
    # A 0/1 mask with "weights" equals dropping the masked tokens from the KD term.
    mask = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 1.0], dtype=F64)
    masked = distillation_loss(z, labels, idx, q, alpha=1.0, kind="nll", token_weights=mask, kd_norm="weights")
    keep = torch.tensor([0, 2, 3])
    torch.testing.assert_close(masked.kd_loss,
                               distillation_loss(z[keep], labels[keep], idx[keep], q[keep], alpha=1.0, kind="nll").kd_loss)
    # Weights touch the KD term only; the LM term is the plain cross-entropy.
    torch.testing.assert_close(masked.lm_loss, F.cross_entropy(z, labels, ignore_index=-100))


def test_student_tau_of_ones_equals_shared_normaliser_and_differs_otherwise():
    z, labels, idx, q = make_case(9, 5, 8, 3, pad=0, ignored=0.0)
    a = distillation_loss(z, labels, idx, q, alpha=0.5, kind="kld").loss
    b = distillation_loss(z, labels, idx, q, alpha=0.5, kind="kld", student_tau=torch.ones(5, dtype=F64)).loss
    c = distillation_loss(z, labels, idx, q, alpha=0.5, kind="kld", student_tau=2.0)
    torch.testing.assert_close(a, b, rtol=1e-13, atol=0)
    # τ_s only changes the KD term: the LM term keeps the untempered normaliser.
    torch.testing.assert_close(c.lm_loss, F.cross_entropy(z, labels))
    assert abs(c.loss.item() - a.item()) > 1e-3


@SETTINGS
@given(c=case, kind=st.sampled_from(LOSS_KINDS), kfrac=st.floats(0, 1), pad=st.integers(0, 3),
       alpha=st.sampled_from([0.3, 1.0]), chunk=st.integers(1, 7), t_norm=st.sampled_from([0.5, 1.5, 4.0]),
       use_w=st.booleans())
def test_normkd_student_tau_is_in_the_graph_and_detached_drops_only_that_path(c, kind, kfrac, pad, alpha, chunk,
                                                                               t_norm, use_w):
    # NormKD (Chi et al. 2023): τ_s = T_norm·std(z_s) (population std over V) is a function of z_s.
    seed, n, v = c[:3]
    z, labels, idx, q = make_case(seed, n, v, 1 + round(kfrac * (v - 1)), pad, ignored=0.3)
    w = torch.rand(n, generator=torch.Generator().manual_seed(seed + 2), dtype=F64) + 0.5 if use_w else None
    z.requires_grad_()
    tau_s = t_norm * z.std(-1, correction=0)
    kw = dict(alpha=alpha, kind=kind, chunk_size=chunk, token_weights=w, normkd_t=t_norm)
    for mode, tau_ref in (("graph", tau_s), ("detached", tau_s.detach())):
        out = distillation_loss(z, labels, idx, q, normkd_student_tau=mode, **kw)
        ref = dense_reference(z, labels, idx, q, alpha=alpha, kind=kind, tau=tau_ref, weights=w)[0]
        torch.testing.assert_close(out.loss, ref, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(torch.autograd.grad(out.loss, z)[0], torch.autograd.grad(ref, z)[0],
                                   rtol=1e-9, atol=1e-12)


def test_normkd_detached_reproduces_the_old_constant_student_tau():
    # Before issue 16 the module passed τ_s = std_temperature(logit_std(z.detach())) as a constant.
    z, labels, idx, q = make_case(16, 6, 50, 12, pad=3, ignored=0.2)
    z.requires_grad_()
    old = distillation_loss(z, labels, idx, q, alpha=1.0, kind="kld", chunk_size=4,
                            student_tau=std_temperature(logit_std(z.detach()), 1.5))
    new = distillation_loss(z, labels, idx, q, alpha=1.0, kind="kld", chunk_size=4, normkd_t=1.5,
                            normkd_student_tau="detached")
    torch.testing.assert_close(new.loss, old.loss, rtol=1e-6, atol=0)  # the old τ_s went through float32
    torch.testing.assert_close(torch.autograd.grad(new.loss, z)[0], torch.autograd.grad(old.loss, z)[0],
                               rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("mode", ["graph", "detached"])
def test_normkd_fused_equals_unfused(mode):
    # The fused path computes z per chunk; τ_s needs whole rows, which every chunk has.
    _, labels, idx, q = make_case(17, 9, 30, 8, pad=2, ignored=0.2)
    g = torch.Generator().manual_seed(17)
    h = torch.randn(9, 5, generator=g, dtype=F64, requires_grad=True)
    w = torch.randn(30, 5, generator=g, dtype=F64, requires_grad=True)
    kw = dict(alpha=0.8, kind="kld", chunk_size=4, normkd_t=1.5, normkd_student_tau=mode)
    fused = distillation_loss(None, labels, idx, q, hidden=h, lm_head_weight=w, fused=True, **kw)
    plain = distillation_loss(h @ w.t(), labels, idx, q, **kw)
    torch.testing.assert_close(fused.loss, plain.loss, rtol=1e-12, atol=0)
    for a, b in zip(torch.autograd.grad(fused.loss, (h, w)), torch.autograd.grad(plain.loss, (h, w))):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-13)


def test_student_tau_that_requires_grad_is_refused_not_silently_detached():
    z, labels, idx, q = make_case(18, 4, 9, 3, pad=0, ignored=0.0)
    z.requires_grad_()
    with pytest.raises(ValueError, match="normkd_t"):
        distillation_loss(z, labels, idx, q, alpha=0.5, student_tau=1.5 * z.std(-1, correction=0))
    with pytest.raises(ValueError, match="not both"):
        distillation_loss(z, labels, idx, q, alpha=0.5, student_tau=2.0, normkd_t=1.5)


def test_padding_slots_and_ignored_rows_are_harmless():
    z, labels, idx, q = make_case(10, 4, 9, 3, pad=0, ignored=0.0)
    ref = distillation_loss(z, labels, idx, q, alpha=0.9, kind="jsd").loss
    idx_p = torch.cat([idx, torch.tensor([[-1], [idx[1, 0]], [0], [-1]])], 1)  # -1 and duplicates, q = 0
    q_p = torch.cat([q, torch.zeros(4, 1, dtype=F64)], 1)
    for kind in LOSS_KINDS:
        a = distillation_loss(z, labels, idx, q, alpha=0.9, kind=kind).loss
        torch.testing.assert_close(distillation_loss(z, labels, idx_p, q_p, alpha=0.9, kind=kind).loss, a)
    # An ignored row full of NaN teacher data changes nothing and stays finite.
    z2, lab2 = torch.cat([z, z[:1]]), torch.cat([labels, torch.tensor([-100])])
    q2 = torch.cat([q, torch.full((1, 3), float("nan"), dtype=F64)])
    z2.requires_grad_()
    out = distillation_loss(z2, lab2, torch.cat([idx, idx[:1]]), q2, alpha=0.9, kind="jsd")
    torch.testing.assert_close(out.loss, ref)
    assert torch.isfinite(torch.autograd.grad(out.loss, z2)[0]).all()


def test_bf16_logits_use_fp32_math():
    z, labels, idx, q = make_case(11, 6, 50, 5, pad=1, ignored=0.2, dtype=torch.bfloat16)
    z32 = z.float().requires_grad_()
    z.requires_grad_()
    a = distillation_loss(z, labels, idx, q, alpha=0.9, kind="mse", chunk_size=4)
    b = distillation_loss(z32, labels, idx, q, alpha=0.9, kind="mse", chunk_size=4)
    assert a.loss.dtype == torch.float32
    torch.testing.assert_close(a.loss, b.loss, rtol=1e-6, atol=1e-7)
    ga, gb = torch.autograd.grad(a.loss, z)[0], torch.autograd.grad(b.loss, z32)[0]
    assert ga.dtype == torch.bfloat16
    torch.testing.assert_close(ga, gb.to(torch.bfloat16))


def test_fused_under_cpu_autocast_matches_bf16_head():
    _, labels, idx, q = make_case(12, 8, 40, 6, pad=2, ignored=0.1)
    h = torch.randn(8, 16, requires_grad=True)
    w = (torch.randn(40, 16) * 0.3).requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fused = distillation_loss(None, labels, idx, q, alpha=0.9, kind="kld", hidden=h, lm_head_weight=w,
                                  fused=True, chunk_size=3)
        plain = distillation_loss(F.linear(h, w), labels, idx, q, alpha=0.9, kind="kld", chunk_size=3)
    torch.testing.assert_close(fused.loss, plain.loss, rtol=1e-5, atol=1e-6)
    gf, gp = torch.autograd.grad(fused.loss, (h, w)), torch.autograd.grad(plain.loss, (h, w))
    for a, b in zip(gf, gp):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-3)


def test_fused_saves_no_vocab_sized_tensor():
    n, v = 32, 500
    _, labels, idx, q = make_case(13, n, v, 8, pad=0, ignored=0.0, dtype=torch.float32)
    h = torch.randn(n, 8, requires_grad=True)
    w = torch.randn(v, 8, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        out = distillation_loss(None, labels, idx, q, alpha=0.9, kind="mse", hidden=h, lm_head_weight=w,
                                fused=True, chunk_size=4)
    # Only grad_h [N, H] and grad_w [V, H] (and tiny [chunk, K] pieces) are kept, never [N, V] or [chunk, V].
    assert saved and max(saved) <= v * 8 < n * v
    out.loss.backward()
    assert h.grad is not None and w.grad is not None


def test_no_grad_path_gives_same_value():
    z, labels, idx, q = make_case(14, 5, 9, 3, pad=0, ignored=0.0)
    with_grad = distillation_loss(z.clone().requires_grad_(), labels, idx, q, alpha=0.5, kind="tvd").loss
    with torch.no_grad():
        without = distillation_loss(z, labels, idx, q, alpha=0.5, kind="tvd").loss
    torch.testing.assert_close(with_grad.detach(), without, rtol=0, atol=0)


def test_auto_chunk_size():
    assert auto_chunk_size(151_552) == 221 and auto_chunk_size(10) > 1_000_000


@pytest.mark.parametrize(("kwargs", "needle"), [
    (dict(kind="kldd"), "did you mean 'kld'"),
    (dict(kind="nll", kd_norm="token"), "did you mean 'tokens'"),
    (dict(kind="nll", alpha=1.5), "loss.alpha=1.5"),
    (dict(kind="jsd", jsd_beta=0.0), "loss.jsd_beta=0.0"),
    (dict(kind="nll", student_tau=0.0), "loss.student_tau=0.0"),
    (dict(kind="nll", chunk_size=0), "loss.chunk_size=0"),
    (dict(kind="nll", normkd_t=0.0), "logits.normkd_t=0.0"),
    (dict(kind="nll", normkd_t=1.5, normkd_student_tau="detach"), "did you mean 'detached'"),
])
def test_bad_arguments_raise_config_error(kwargs, needle):
    z, labels, idx, q = make_case(15, 3, 5, 2, pad=0, ignored=0.0)
    kwargs = {"alpha": 0.5, **kwargs}
    with pytest.raises(ConfigError, match=needle.replace("(", r"\(")) as e:
        distillation_loss(z, labels, idx, q, **kwargs)
    assert "\n" not in str(e.value)
