"""Distillation losses on the teacher's sparse support, α mixing (Eq. 1), chunked and fused.

Notation (one row = one token position; next-token shifting is the caller's job):

    z    student logits, [N, V]                 labels  [N], -100 = ignored
    p    = softmax(z)            (LM term)      p^τ = softmax(z / τ_s)   (KD term, NormKD)
    S    teacher support: indices [N, K] with probabilities q [N, K] from the logit store,
         already truncated (top-p-k) and tempered. Slots with q = 0 (padding up to K) are NOT
         in S; indices inside one row are assumed distinct. q is expected to sum to 1 on S,
         except for sampled targets (below), whose importance weights sum to 1 in expectation.

    L    = (1 - α) · L_lm + α · L_kd                                    (paper Eq. 1)
    L_lm = Σ_t m_t (-log p_t[y_t]) / Σ_t m_t,      m_t = [y_t != -100]
    L_kd = Σ_t m_t w_t τ_t² D_t / Z,   Z = Σ_t m_t ("tokens", default) or Σ_t m_t w_t ("weights")

w_t are optional per-token weights (WTTM's U, document-boundary masks; default 1) and τ_t the
optional `tau_sq_scale` (Hinton's τ² gradient correction; NormKD passes its per-token τ_t).
The default "tokens" normaliser makes WTTM exact (mean(U · KL)) and keeps L_kd on the same scale
as L_lm whatever the weights; "weights" gives a true weighted mean. Ignored tokens (-100) count in
neither term, so padding should be masked through the labels.

NormKD (Chi et al. 2023) tempers the student by its own spread: τ_s = T_norm · σ(z) per token, σ the
population std of the row over V (σ² = Σ_V (z_j - μ)² / V), floored at NORMKD_MIN_TAU. τ_s is a
function of z, so by default ("graph", as in the authors' code) the gradient flows through it too:

    dL/dz_j = ∂L/∂z_j|τ_s + (dL/dτ_s) · ∂τ_s/∂z_j,   dL/dτ_s = -⟨g, z⟩ / τ_s,
    ∂τ_s/∂z_j = T_norm · (z_j - μ) / (V · σ)          (0 where the floor is active),

g = ∂L_kd/∂z|τ_s fixed, the KD part of the gradient in that row. "detached" drops the second term
(τ_s treated as a constant): same loss value, a different gradient, NOT the cited method. σ is
computed from each whole row inside the chunk loop, so both modes are exact chunked and fused.

Distances D_t (all computed from log p^τ gathered on S, never from a dense teacher):

    nll  -Σ_S q_i log p_i                                         (soft cross-entropy)
    kld  Σ_S q_i (log q_i - log p_i)                              (forward KL; = nll + const)
    mse  Σ_V (q_i - p_i)² = Σ_V p_i² - 2 Σ_S q_i p_i + Σ_S q_i²   (q = 0 off S; exact over V)
    tvd  ½ Σ_V |q_i - p_i| = ½ (Σ_S |q_i - p_i| + (1 - Σ_S p_i))  (off-support student mass counts)
    rkl  Σ_S p̃_i (log p̃_i - log q_i)                              (reverse KL, restricted to S)
    jsd  β KL(q ‖ m) + (1-β) KL(p̃ ‖ m),  m = β q + (1-β) p̃,  0 < β < 1  (generalised JSD on S)

Sampled targets (logits.sampling=sample; `logits.processing.sampled_targets`): q = t, an unbiased
estimate of the teacher p_τ from draws (t = c/N at τ = 1). Every gradient below is linear in q,
∂D/∂z = (Σ_S q)·p - q for nll and kld, so E[∇] is the full-vocabulary gradient exactly; kld's value
uses the teacher's stored log p_τ (`teacher_log_target`): Σ_S q (log p_τ - log p) is unbiased for
KL(p_τ ‖ p), the plug-in Σ_S q log(q / p) is not. The other distances are refused on sampled targets
(`config.SAMPLED_LOSS_KINDS`): their values or gradients are not linear in q.

For rkl and jsd the student is renormalised on the support: p̃_i = p_i / Σ_{j∈S} p_j for i ∈ S
(equivalently softmax over S of z/τ_s). Off-support student mass is therefore *not* penalised by
these two; with the full vocabulary as support they are the exact reverse KL / JSD. A token with
an empty support contributes D = 0 to rkl/jsd (and to nll/kld).

Memory: one pass over token chunks computes log_softmax once per chunk, shares it between L_lm and
L_kd (when τ_s = 1; otherwise the KD term needs its own normaliser of z/τ_s), and writes the
gradient wrt the logits in the same pass (as Liger-Kernel does), so backward is a scale.
With fused=True the LM head (hidden @ W^T) is computed per chunk too and the gradients wrt hidden
and W are accumulated chunk by chunk: no [N, V] tensor is ever stored.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from pd_lightning.config import LOSS_KINDS, check_field  # the names and ranges, declared with the config fields
from pd_lightning.errors import ConfigError, choice_error

IGNORE_INDEX = -100
KD_NORMS = ("tokens", "weights")  # an argument of distillation_loss only, no config field
NORMKD_MIN_TAU = 1e-3  # the floor logits.processing.std_temperature puts on the teacher's τ_t too
# Auto chunk size keeps each fp32 [chunk, V] temporary near this size (≈221 tokens at V = 151,552).
DEFAULT_CHUNK_BYTES = 128 * 2**20


class LossOutput(NamedTuple):
    """Total loss (differentiable) and its two terms (detached, for logging)."""

    loss: Tensor
    lm_loss: Tensor
    kd_loss: Tensor


def auto_chunk_size(vocab_size: int) -> int:
    """Tokens per chunk such that one fp32 [chunk, V] buffer is about DEFAULT_CHUNK_BYTES."""
    return max(1, DEFAULT_CHUNK_BYTES // (4 * vocab_size))


def sparse_kd_distance(logp_s: Tensor, q: Tensor, kind: str, *, sum_p2: Tensor | None = None,
                       jsd_beta: float = 0.5, log_target: Tensor | None = None) -> Tensor:
    """Per-token distance D [n] from student log-probs on the support logp_s [n, K] and teacher q [n, K].

    `sum_p2` = Σ_V p_i² [n] is needed for mse only. See the module docstring for the formulas.
    `log_target` [n, K] (sampled targets): kld's teacher term is Σ q log p_τ with the teacher's own
    log-probabilities, the unbiased estimate of -H(p_τ), instead of Σ q log q (same gradient).
    Every term is masked with `torch.where` so padding slots stay finite in value and gradient.
    """
    on = q > 0
    if kind in ("nll", "kld"):
        d = -(q * torch.where(on, logp_s, 0.0)).sum(-1)
        if kind == "kld":
            if log_target is None:
                d = d + torch.xlogy(q, q).sum(-1)  # xlogy(0, 0) = 0 for padding slots
            else:
                d = d + (q * torch.where(on, log_target, 0.0)).sum(-1)
        return d
    if kind == "mse":
        if sum_p2 is None:
            raise ValueError("mse needs sum_p2 = Σ_V p²")
        p_s = torch.where(on, logp_s, 0.0).exp() * on
        return sum_p2 - 2.0 * (q * p_s).sum(-1) + (q * q).sum(-1)
    if kind == "tvd":
        p_s = torch.where(on, logp_s, 0.0).exp() * on
        return 0.5 * ((q - p_s).abs() * on).sum(-1) + 0.5 * (1.0 - p_s.sum(-1))
    if kind in ("rkl", "jsd"):
        # A row with an empty support gets a fake one-slot support with q = 1 and p̃ = 1 (D = 0),
        # so logsumexp never sees an all -inf row (which would give NaN gradients).
        empty = ~on.any(-1, keepdim=True)
        first = torch.zeros_like(on)
        first[:, :1] = True
        fake = empty & first
        on = on | fake
        q = torch.where(fake, 1.0, q)
        lse_s = torch.logsumexp(torch.where(on, logp_s, float("-inf")), -1, keepdim=True)
        log_pt = torch.where(on, logp_s - lse_s, 0.0)  # log p̃ on S, 0 (unused) elsewhere
        pt = log_pt.exp() * on
        log_q = torch.where(on, q, 1.0).log()
        if kind == "rkl":
            return (pt * torch.where(on, log_pt - log_q, 0.0)).sum(-1)
        b = jsd_beta
        log_m = torch.logaddexp(log_q + math.log(b), log_pt + math.log(1.0 - b))
        kl_qm = (q * torch.where(on, log_q - log_m, 0.0)).sum(-1)
        kl_pm = (pt * torch.where(on, log_pt - log_m, 0.0)).sum(-1)
        return b * kl_qm + (1.0 - b) * kl_pm
    raise choice_error("loss.kind", kind, LOSS_KINDS)


def std_tau(z: Tensor, t_norm: float) -> tuple[Tensor, Tensor, Tensor]:
    """NormKD's student temperature per row: τ_s = max(T_norm · σ(z), NORMKD_MIN_TAU).

    z [n, V] -> (τ_s [n, 1], σ [n], μ [n]) in z's dtype; σ is the population std over V
    (correction 0), the statistic `logits.processing.logit_std` records for the teacher's τ_t.
    """
    sigma, mu = torch.std_mean(z, -1, correction=0)
    return (t_norm * sigma).clamp_min(NORMKD_MIN_TAU)[:, None], sigma, mu


def add_std_tau_grad(dz: Tensor, g_tau: Tensor, z: Tensor, sigma: Tensor, mu: Tensor, t_norm: float) -> Tensor:
    """dz += (dL/dτ_s) · ∂τ_s/∂z in place, ∂τ_s/∂z_j = T_norm · (z_j - μ) / (V · σ); returns dz.

    dz, z [n, V]; g_tau = dL/dτ_s, sigma, mu [n] (from `std_tau`). Rows whose τ_s is floored get
    nothing (the floor is flat). Two in-place passes over dz, no [n, V] temporary.
    """
    live = t_norm * sigma > NORMKD_MIN_TAU
    r = torch.where(live, g_tau * t_norm / (z.shape[-1] * sigma.clamp_min(torch.finfo(z.dtype).tiny)), 0.0)
    dz.addcmul_(z, r[:, None])
    return dz.sub_((r * mu)[:, None])


def _chunk(z: Tensor, labels: Tensor, lm_coef: Tensor, idx: Tensor | None, q: Tensor | None,
           kd_coef: Tensor | None, tau: Tensor | float | None, kind: str, jsd_beta: float,
           alpha: float, need_grad: bool, out: Tensor | None = None, t_norm: float | None = None,
           tau_grad: bool = True, log_target: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor | None]:
    """One chunk: returns (Σ lm_coef·lm_t, Σ kd_coef·D_t, dL/dz or None), z upcast already.

    Gradients come from the chain rule through the few gathered quantities the loss depends on:
    ∂ log p_k / ∂z_j = δ_jk - p_j and ∂(Σ_V p²)/∂z_j = 2 p_j (p_j - Σ_V p²); the sparse part is
    differentiated by autograd on [n, K] tensors, the dense part is one in-place pass over p.
    `out`, if given, is a [n, V] buffer of z's dtype that receives log p and then the gradient.
    `t_norm` set (NormKD): τ_s = std_tau(z, t_norm) replaces `tau`; with `tau_grad` its gradient
    (module docstring) is added, which needs the whole row of z: chunks split tokens, never V.
    """
    do_kd = alpha > 0.0
    std_stats = None
    if do_kd and t_norm is not None:
        tau, sigma, mu = std_tau(z, t_norm)
        std_stats = (sigma, mu) if tau_grad else None
    lab = labels.clamp_min(0)[:, None]  # ignored rows have lm_coef = 0; any valid index will do
    logp = torch.log_softmax(z, -1, out=out) if out is not None else torch.log_softmax(z, -1)
    logp_lab = logp.gather(1, lab).squeeze(1)
    shared = tau is None
    logpk = logp
    if do_kd and not shared:
        logpk = torch.log_softmax(z / tau, -1)
    if do_kd:
        logp_s = logpk.gather(1, idx)
        # The probabilities are needed for the gradient anyway, so exponentiate in place.
        pk = logpk.exp_()
        sum_p2 = torch.linalg.vecdot(pk, pk) if kind == "mse" else None
    p = logpk if (do_kd and shared) else None

    with torch.enable_grad():
        a = logp_lab.detach().requires_grad_(need_grad)
        lm_sum = -(lm_coef * a).sum()
        total = (1.0 - alpha) * lm_sum
        if do_kd:
            b = logp_s.detach().requires_grad_(need_grad)
            c = sum_p2.detach().requires_grad_(need_grad) if sum_p2 is not None else None
            kd_sum = (kd_coef * sparse_kd_distance(b, q, kind, sum_p2=c, jsd_beta=jsd_beta, log_target=log_target)).sum()
            total = total + alpha * kd_sum
        else:
            kd_sum = torch.zeros((), dtype=z.dtype, device=z.device)
        if not need_grad:
            return lm_sum.detach(), kd_sum.detach(), None
        leaves = [a] + ([b] + ([c] if c is not None else []) if do_kd else [])
        grads = torch.autograd.grad(total, leaves, allow_unused=True)
    ga = grads[0] if grads[0] is not None else torch.zeros_like(a)
    if do_kd:
        gb = grads[1] if grads[1] is not None else torch.zeros_like(b)
        gc = grads[2] if c is not None and grads[2] is not None else None
        if not shared:  # chain rule through u = z / τ_s
            gb = gb / tau
            if gc is not None:
                gc = gc / (tau.squeeze(-1) if isinstance(tau, Tensor) else tau)
        coef_k = -gb.sum(-1)
        if gc is not None:
            coef_k = coef_k - 2.0 * gc * sum_p2

    if do_kd and shared:
        coef = (coef_k - ga)[:, None]
        if gc is not None:  # mse: dz = p ⊙ (coef + 2 g_c p)
            dz = p * (2.0 * gc)[:, None]
            dz.add_(coef).mul_(p)
            if out is not None:
                out.copy_(dz)
                dz = out
        else:
            dz = p.mul_(coef)
    else:
        # Here logp is still log p (untouched by the KD branch), so exponentiate it in place.
        dz = logp.exp_().mul_(-ga[:, None])
        if do_kd:
            if gc is not None:
                dk = pk * (2.0 * gc)[:, None]
                dk.add_(coef_k[:, None]).mul_(pk)
            else:
                dk = pk.mul_(coef_k[:, None])
            if std_stats is not None:
                # g = dk + scatter(idx, gb) is ∂L_kd/∂z at fixed τ_s, so dL/dτ_s = -⟨g, z⟩ / τ_s.
                g_tau = -(torch.linalg.vecdot(dk, z) + (gb * z.gather(1, idx)).sum(-1)) / tau.squeeze(-1)
            dz.add_(dk)
    dz.scatter_add_(1, lab, ga[:, None])
    if do_kd:
        dz.scatter_add_(1, idx, gb)
        if std_stats is not None:
            add_std_tau_grad(dz, g_tau, z, *std_stats, t_norm)
    return lm_sum.detach(), kd_sum.detach(), dz


class _SparseDistill(torch.autograd.Function):
    """Chunked PD loss from given logits; dL/dlogits is written during forward, backward scales it."""

    @staticmethod
    def forward(ctx, logits, labels, lm_coef, idx, q, kd_coef, tau, kind, jsd_beta, alpha, chunk, need_grad,
                t_norm, tau_grad, log_target):
        cdtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
        n_tok = logits.shape[0]
        grad = torch.empty_like(logits) if need_grad else None
        lm_tot = torch.zeros((), dtype=cdtype, device=logits.device)
        kd_tot = torch.zeros((), dtype=cdtype, device=logits.device)
        for s in range(0, n_tok, chunk):
            e = min(s + chunk, n_tok)
            z = logits[s:e].to(cdtype)
            # Same dtype: log p and then the gradient live directly in the grad buffer (no copy).
            out = grad[s:e] if (need_grad and logits.dtype == cdtype) else None
            lm, kd, dz = _chunk(z, labels[s:e], lm_coef[s:e], _sl(idx, s, e), _sl(q, s, e), _sl(kd_coef, s, e),
                                _sl(tau, s, e), kind, jsd_beta, alpha, need_grad, out=out, t_norm=t_norm,
                                tau_grad=tau_grad, log_target=_sl(log_target, s, e))
            lm_tot += lm
            kd_tot += kd
            if need_grad and out is None:
                grad[s:e].copy_(dz)
            del z, dz
        if need_grad:
            ctx.save_for_backward(grad)
        ctx.mark_non_differentiable(lm_tot, kd_tot)
        loss = (1.0 - alpha) * lm_tot + alpha * kd_tot
        return loss, lm_tot, kd_tot

    @staticmethod
    def backward(ctx, g_loss, g_lm, g_kd):
        (grad,) = ctx.saved_tensors
        if float(g_loss) != 1.0:  # the usual loss.backward() passes 1: skip a pass over [N, V]
            grad = grad * g_loss.to(grad.dtype)
        return (grad,) + (None,) * 14


class _FusedLinearDistill(torch.autograd.Function):
    """PD loss of hidden @ W^T computed chunk by chunk; grads wrt hidden and W accumulated in forward."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, lm_coef, idx, q, kd_coef, tau, kind, jsd_beta, alpha, chunk,
                need_grad, mm_dtype, t_norm, tau_grad, log_target):
        cdtype = torch.float64 if mm_dtype == torch.float64 else torch.float32
        n_tok = hidden.shape[0]
        w = weight.to(mm_dtype)
        grad_h = torch.empty_like(hidden) if need_grad else None
        # Accumulate dW in (at least) fp32: summing chunk contributions in bf16 would lose bits.
        grad_w = torch.zeros(weight.shape, dtype=cdtype, device=weight.device) if need_grad else None
        lm_tot = torch.zeros((), dtype=cdtype, device=hidden.device)
        kd_tot = torch.zeros((), dtype=cdtype, device=hidden.device)
        for s in range(0, n_tok, chunk):
            e = min(s + chunk, n_tok)
            h = hidden[s:e].to(mm_dtype)
            z = (h @ w.t()).to(cdtype)
            lm, kd, dz = _chunk(z, labels[s:e], lm_coef[s:e], _sl(idx, s, e), _sl(q, s, e), _sl(kd_coef, s, e),
                                _sl(tau, s, e), kind, jsd_beta, alpha, need_grad, t_norm=t_norm, tau_grad=tau_grad,
                                log_target=_sl(log_target, s, e))
            del z
            lm_tot += lm
            kd_tot += kd
            if need_grad:
                dz = dz.to(mm_dtype)
                grad_h[s:e] = dz @ w
                if dz.dtype == cdtype:
                    grad_w.addmm_(dz.t(), h)
                else:
                    grad_w += (dz.t() @ h).to(cdtype)
            del dz
        if need_grad:
            ctx.save_for_backward(grad_h, grad_w.to(weight.dtype))
        ctx.mark_non_differentiable(lm_tot, kd_tot)
        loss = (1.0 - alpha) * lm_tot + alpha * kd_tot
        return loss, lm_tot, kd_tot

    @staticmethod
    def backward(ctx, g_loss, g_lm, g_kd):
        grad_h, grad_w = ctx.saved_tensors
        if float(g_loss) != 1.0:
            grad_h = grad_h * g_loss.to(grad_h.dtype)
            grad_w = grad_w * g_loss.to(grad_w.dtype)
        return (grad_h, grad_w) + (None,) * 15


def _sl(x, s: int, e: int):
    """Row slice of an optional per-token tensor (scalars and None pass through)."""
    return x[s:e] if isinstance(x, Tensor) and x.dim() > 0 else x


def distillation_loss(
    student_logits: Tensor | None,
    labels: Tensor,
    teacher_indices: Tensor | None = None,
    teacher_probs: Tensor | None = None,
    *,
    alpha: float,
    kind: str = "kld",
    hidden: Tensor | None = None,
    lm_head_weight: Tensor | None = None,
    fused: bool = False,
    chunk_size: int | None = None,
    token_weights: Tensor | None = None,
    kd_norm: str = "tokens",
    student_tau: float | Tensor | None = None,
    tau_sq_scale: float | Tensor | None = None,
    jsd_beta: float = 0.5,
    normkd_t: float | None = None,
    normkd_student_tau: str = "graph",
    teacher_log_target: Tensor | None = None,
) -> LossOutput:
    """L = (1-α)·L_lm + α·L_kd on the teacher's sparse support, chunked (and fused with the LM head).

    Shapes: student_logits [N, V] (or [..., V]); labels [N] with -100 = ignored; teacher_indices and
    teacher_probs [N, K] (probabilities after truncation and temperature, q = 0 on padding slots).
    With fused=True pass hidden [N, H] and lm_head_weight [V, H] instead of student_logits.
    alpha = 0 returns exactly F.cross_entropy(student_logits, labels, ignore_index=-100) (unfused)
    and never touches the teacher tensors (they may be None). student_tau (scalar or [N], a
    constant: a tensor that requires grad is refused) tempers the student in the KD term only:
    p^τ = softmax(z/τ_s). normkd_t = T_norm instead sets NormKD's τ_s = T_norm·std(z_s) per token
    (population std over V, from each row inside the chunk loop, fused too); normkd_student_tau
    "graph" (default, Chi et al. 2023) differentiates through τ_s, "detached" holds it constant,
    which departs from the method (see the module docstring for both gradients).
    tau_sq_scale τ (scalar or [N]) multiplies each token's D by τ². teacher_log_target [N, K] (sampled
    targets, `TeacherTargets.log_target`): the teacher's log p_τ for kld's value (module docstring;
    the gradient does not depend on it, the other kinds ignore it). chunk_size None = auto
    (≈128 MiB of fp32 per [chunk, V] buffer). If every label is ignored, the α > 0 path gives 0.
    Returns LossOutput(loss, lm_loss.detach(), kd_loss.detach()).
    """
    # A public function: the arguments are checked against the config fields they mirror.
    check_field("loss.kind", kind)
    if kd_norm not in KD_NORMS:
        raise choice_error("loss.kd_norm", kd_norm, KD_NORMS)
    alpha = check_field("loss.alpha", float(alpha))
    if kind == "jsd":
        check_field("loss.jsd_beta", jsd_beta)
    if chunk_size is not None:
        check_field("loss.chunk_size", chunk_size)
    check_field("logits.normkd_student_tau", normkd_student_tau)
    if normkd_t is not None:
        check_field("logits.normkd_t", float(normkd_t))
        if student_tau is not None:
            raise ValueError("pass student_tau (a constant τ_s) or normkd_t (τ_s = normkd_t·std(z_s)), not both")

    if fused:
        if hidden is None or lm_head_weight is None:
            raise ValueError("fused=True needs hidden [N, H] and lm_head_weight [V, H]")
        hidden = hidden.reshape(-1, hidden.shape[-1])
        n_tok, vocab = hidden.shape[0], lm_head_weight.shape[0]
        device = hidden.device
    else:
        if student_logits is None:
            raise ValueError("student_logits is required unless fused=True")
        vocab = student_logits.shape[-1]
        logits = student_logits.reshape(-1, vocab)
        n_tok, device = logits.shape[0], logits.device
    labels = labels.reshape(-1)
    if labels.shape[0] != n_tok:
        raise ValueError(f"labels has {labels.shape[0]} tokens, the student has {n_tok}")

    if alpha == 0.0 and not fused:
        # The LM baseline must be the plain LM loss bit for bit; no KD work at all.
        lm = F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX)
        return LossOutput(lm, lm.detach(), torch.zeros((), dtype=lm.dtype, device=device))

    chunk = int(chunk_size) if chunk_size is not None else auto_chunk_size(vocab)
    valid = labels != IGNORE_INDEX
    cdtype = torch.float64 if (hidden if fused else logits).dtype == torch.float64 else torch.float32
    n_valid = valid.sum().clamp_min(1).to(cdtype)
    lm_coef = valid.to(cdtype) / n_valid

    idx = q = kd_coef = tau = log_target = None
    if alpha > 0.0:
        if teacher_indices is None or teacher_probs is None:
            raise ValueError("alpha > 0 needs teacher_indices and teacher_probs")
        idx = teacher_indices.reshape(n_tok, -1).to(device=device, dtype=torch.long).clamp_min(0)
        # Ignored rows may hold anything (even NaN); zero them so 0-weighted rows stay finite.
        q = torch.where(valid[:, None], teacher_probs.reshape(n_tok, -1).to(device=device, dtype=cdtype), 0.0)
        w = valid.to(cdtype)
        if token_weights is not None:
            w = w * token_weights.reshape(-1).detach().to(device=device, dtype=cdtype)
        denom = n_valid if kd_norm == "tokens" else w.sum().clamp_min(torch.finfo(cdtype).tiny)
        kd_coef = w / denom
        if tau_sq_scale is not None:
            t = torch.as_tensor(tau_sq_scale, dtype=cdtype, device=device).detach()
            kd_coef = kd_coef * t.reshape(-1) ** 2 if t.dim() > 0 else kd_coef * t**2
        tau = _student_tau(student_tau, n_tok, cdtype, device)
        if teacher_log_target is not None and kind == "kld":
            log_target = teacher_log_target.reshape(n_tok, -1).to(device=device, dtype=cdtype)
    t_norm = float(normkd_t) if normkd_t is not None else None
    tau_grad = normkd_student_tau == "graph"

    if fused:
        need_grad = torch.is_grad_enabled() and (hidden.requires_grad or lm_head_weight.requires_grad)
        mm_dtype = hidden.dtype
        dev_type = device.type
        if torch.is_autocast_enabled(dev_type):
            # Mimic autocast's linear: the LM head matmul runs in the autocast dtype.
            mm_dtype = torch.get_autocast_dtype(dev_type)
        elif hidden.dtype != lm_head_weight.dtype:
            raise ValueError(f"hidden is {hidden.dtype} but lm_head_weight is {lm_head_weight.dtype}")
        with torch.autocast(dev_type, enabled=False):
            loss, lm, kd = _FusedLinearDistill.apply(hidden, lm_head_weight, labels, lm_coef, idx, q, kd_coef, tau,
                                                     kind, jsd_beta, alpha, chunk, need_grad, mm_dtype, t_norm,
                                                     tau_grad, log_target)
    else:
        need_grad = torch.is_grad_enabled() and logits.requires_grad
        with torch.autocast(device.type, enabled=False):
            loss, lm, kd = _SparseDistill.apply(logits, labels, lm_coef, idx, q, kd_coef, tau, kind, jsd_beta,
                                                alpha, chunk, need_grad, t_norm, tau_grad, log_target)
    return LossOutput(loss, lm.detach(), kd.detach())


def _student_tau(student_tau: float | Tensor | None, n_tok: int, dtype: torch.dtype,
                 device: torch.device) -> Tensor | float | None:
    """None when τ_s = 1 (the LM log-normaliser is shared), else a float or a [N, 1] tensor."""
    if student_tau is None:
        return None
    if not isinstance(student_tau, Tensor):
        t = float(student_tau)
        if not t > 0.0:
            raise ConfigError(f"loss.student_tau={student_tau!r} is out of range; expected a number > 0")
        return None if t == 1.0 else t
    if student_tau.requires_grad:  # detaching it silently would drop a gradient the caller meant to keep
        raise ValueError("student_tau is a constant here; for NormKD's τ_s = T·std(z_s) with its gradient pass "
                         "normkd_t (and normkd_student_tau='detached' for the constant form)")
    t = student_tau.to(device=device, dtype=dtype)
    if t.dim() == 0:
        t = t.expand(n_tok)
    t = t.reshape(-1)
    if t.shape[0] != n_tok:
        raise ValueError(f"student_tau has {t.shape[0]} values for {n_tok} tokens")
    return t[:, None]
