"""Teacher logits processing: top-p-k truncation, temperature, adaptive temperatures.

Everything here is a pure, batched tensor function (no Python loop over tokens).

The store keeps, per token, the top-p-k entries in descending order as τ=1 log-probabilities of
the *full* vocabulary, `log q_i = z_i - logZ`, plus two full-distribution statistics (entropy and
logit std) that cannot be recovered after truncation. Everything a sweep needs is derived from that:

- a narrower truncation `(p', k') <= (p, k)` is a prefix of the stored one (`narrow`);
- a temperature on the support: `softmax(Truncate(z) / τ) = softmax(log q / τ)` on the kept set,
  because `log q = z - logZ` differs from `z` by a per-token constant (`apply_temperature`);
- adaptive methods (NormKD, WTTM, AdaKD-SD, AdaKD-H) use those per-token statistics.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from pd_lightning.errors import ConfigError, choice_error

METHODS = ("none", "normkd", "wttm", "adakd_sd", "adakd_h")


@dataclass
class SparseLogits:
    """Top-p-k teacher entries for N tokens, descending, padded to K columns.

    indices:   [N, K] int64 vocabulary ids (0 in padding columns)
    logprobs:  [N, K] float32 τ=1 log-probabilities of the full vocabulary, descending, -inf padding
    counts:    [N] int64 number of kept entries per token (>= 1)
    entropy:   [N] float32 entropy of the full τ=1 distribution, nats
    logit_std: [N] float32 population std of the full logit vector
    """

    indices: Tensor
    logprobs: Tensor
    counts: Tensor
    entropy: Tensor
    logit_std: Tensor

    def __len__(self) -> int:
        return int(self.counts.shape[0])

    @property
    def width(self) -> int:
        """K, the number of (padded) columns."""
        return int(self.indices.shape[1])

    def to(self, device: torch.device | str) -> "SparseLogits":
        """Move every tensor to `device`."""
        return SparseLogits(*(t.to(device) for t in self._tensors()))

    def rows(self, start: int, stop: int) -> "SparseLogits":
        """Tokens [start, stop) as a view."""
        return SparseLogits(*(t[start:stop] for t in self._tensors()))

    def pad_to(self, width: int) -> "SparseLogits":
        """Pad (never cut) the columns to `width`, keeping the padding convention."""
        extra = width - self.width
        if extra <= 0:
            return self
        n = len(self)
        idx = torch.cat([self.indices, self.indices.new_zeros(n, extra)], 1)
        lp = torch.cat([self.logprobs, self.logprobs.new_full((n, extra), -math.inf)], 1)
        return SparseLogits(idx, lp, self.counts, self.entropy, self.logit_std)

    @staticmethod
    def cat(parts: "list[SparseLogits]") -> "SparseLogits":
        """Concatenate along tokens, padding to the widest part."""
        width = max(p.width for p in parts)
        parts = [p.pad_to(width) for p in parts]
        return SparseLogits(*(torch.cat(ts, 0) for ts in zip(*(p._tensors() for p in parts))))

    def _tensors(self) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        return self.indices, self.logprobs, self.counts, self.entropy, self.logit_std


class TeacherTargets(NamedTuple):
    """What the KD loss needs per token (see `teacher_targets`)."""

    indices: Tensor  # [N, K'] int64 vocabulary ids, 0 in padding
    probs: Tensor  # [N, K'] float32 teacher probabilities on the support, 0 in padding, rows sum to 1
    token_weights: Tensor | None  # [N] per-token loss weight (NormKD τ_t², WTTM U) or None
    student_tau: Tensor | None  # [N] student temperature, or None (untempered; NormKD: see docstring)


def _check_p_k(p: float, k: int) -> None:
    if not (0.0 < float(p) <= 1.0):
        raise ConfigError(f"logits.p={p!r} is out of range; expected 0 < p <= 1")
    if int(k) != k or int(k) < 1:
        raise ConfigError(f"logits.k={k!r} is out of range; expected an integer >= 1")


def _prefix_counts(logprobs: Tensor, p: float) -> Tensor:
    """Per row: the smallest n with Σ_{j<n} q_j >= p, i.e. #{j : Σ_{i<j} q_i < p} (descending rows)."""
    # float64 cumsum so the p boundary is decided the same way for stored and dense inputs.
    q = logprobs.double().exp()
    before = torch.cumsum(q, -1) - q
    # q = 0 entries (masked vocabulary) are never kept, even at p = 1 where float sums fall short of 1
    return torch.minimum((before < p).sum(-1), (q > 0).sum(-1)).clamp_min(1)


def _full_stats(z: Tensor, top1: Tensor, work: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(logZ, entropy, population std) of each row of logits z [n, V]; top1 [n, 1] = row max.

    `work` is a reused [>= n, V] buffer: fresh chunk-sized temporaries would page-fault on every
    chunk, which costs more than the arithmetic on CPU.
    """
    if not bool(torch.isfinite(top1).all()) or bool((z.amin(-1) == -math.inf).any()):
        # -inf marks padded vocabulary rows: slow masked path (0 * -inf would be NaN below)
        log_z = torch.logsumexp(z, -1)
        q = torch.exp(z - log_z[:, None])
        entropy = log_z - torch.where(q > 0, q * z, torch.zeros_like(z)).sum(-1)
        return log_z, entropy, logit_std(z)
    n, vocab = z.shape
    d = work[:n]
    torch.sub(z, top1, out=d)  # d = z - max: shifted so Var = E[d²] - E[d]² keeps its digits
    mean_d = d.sum(-1) / vocab
    var = ((d.unsqueeze(1) @ d.unsqueeze(2)).reshape(-1) / vocab - mean_d * mean_d).clamp_min(0)
    e = d.exp_()  # in place: e = exp(z - max)
    s = e.sum(-1)
    log_z = top1[:, 0] + torch.log(s)
    entropy = log_z - (e.unsqueeze(1) @ z.unsqueeze(2)).reshape(-1) / s  # H = logZ - Σ q z
    return log_z, entropy, var.sqrt()


def truncate_top_p_k(logits: Tensor, p: float, k: int, chunk_tokens: int | None = None) -> SparseLogits:
    """Top-p-k of dense logits [..., V] -> SparseLogits over the flattened tokens.

    q = softmax(z) (τ=1); sort q descending; keep the smallest prefix with Σ q >= p; keep at most k.
    Also returns H = logZ - Σ_i q_i z_i (full-distribution entropy) and std(z) (population std).
    Works in chunks of `chunk_tokens` rows (default 64 on CPU, cache-friendly; 1024 on accelerators,
    fewer launches) so temporaries stay at chunk × V.
    """
    _check_p_k(p, k)
    if chunk_tokens is None:
        chunk_tokens = 64 if logits.device.type == "cpu" else 1024
    vocab = logits.shape[-1]
    z_all = logits.reshape(-1, vocab)
    kk = min(int(k), vocab)
    parts = []
    work = torch.empty(min(chunk_tokens, max(z_all.shape[0], 1)), vocab, device=logits.device)
    for start in range(0, max(z_all.shape[0], 1), chunk_tokens):
        z = z_all[start : start + chunk_tokens].float()
        top, idx = torch.topk(z, kk, dim=-1, largest=True, sorted=True)
        log_z, entropy, std = _full_stats(z, top[:, :1], work)
        lp = top - log_z[:, None]
        counts = _prefix_counts(lp, p)
        keep = torch.arange(kk, device=z.device)[None, :] < counts[:, None]
        lp = torch.where(keep, lp, torch.full_like(lp, -math.inf))
        idx = torch.where(keep, idx, torch.zeros_like(idx))
        parts.append(SparseLogits(idx.long(), lp, counts.long(), entropy, std))
    return parts[0] if len(parts) == 1 else SparseLogits.cat(parts)


def narrow(sparse: SparseLogits, p: float, k: int, store_p: float = 1.0, store_k: int | None = None) -> SparseLogits:
    """Derive top-p'-k' from stored top-p-k entries (p' <= p, k' <= k): a prefix of each row.

    count' = min(k', count, #{j : Σ_{i<j} q_i < p'}) with q the stored τ=1 full-vocabulary
    probabilities -- the same numbers a dense computation would use, so the result is identical.
    Columns are cut to min(k', K).
    """
    _check_p_k(p, k)
    if p > store_p + 1e-12:
        raise ConfigError(f"logits.p={p!r} cannot be derived from a store made at p={store_p}; expected p <= {store_p}")
    if store_k is not None and k > store_k:
        raise ConfigError(f"logits.k={k!r} cannot be derived from a store made at k={store_k}; expected k <= {store_k}")
    width = min(int(k), sparse.width)
    lp = sparse.logprobs[:, :width]
    counts = torch.minimum(_prefix_counts(lp, p), sparse.counts.clamp_max(width))
    keep = torch.arange(width, device=lp.device)[None, :] < counts[:, None]
    lp = torch.where(keep, lp, torch.full_like(lp, -math.inf))
    idx = torch.where(keep, sparse.indices[:, :width], torch.zeros_like(sparse.indices[:, :width]))
    return SparseLogits(idx, lp, counts, sparse.entropy, sparse.logit_std)


def _per_token(tau: float | Tensor, like: Tensor) -> Tensor:
    t = torch.as_tensor(tau, dtype=torch.float32, device=like.device)
    if torch.any(t <= 0):
        raise ConfigError(f"logits.tau={tau if t.dim() == 0 else 'tensor'} is out of range; expected tau > 0")
    return t[:, None] if t.dim() == 1 else t


def apply_temperature(logprobs: Tensor, tau: float | Tensor) -> Tensor:
    """Teacher probabilities on the support: softmax(log q / τ) = softmax(Truncate(z) / τ).

    logprobs [N, K] with -inf padding; τ scalar or per token [N]. Padding gets probability 0.
    """
    return torch.softmax(logprobs.float() / _per_token(tau, logprobs), dim=-1)


def std_temperature(logit_std: Tensor, t_norm: float = 1.5, min_tau: float = 1e-3) -> Tensor:
    """NormKD temperature τ = T_norm · std(z), per token (teacher: stored std; student: z_s.std(-1, correction=0))."""
    if t_norm <= 0:
        raise ConfigError(f"logits.t_norm={t_norm!r} is out of range; expected t_norm > 0")
    return (t_norm * logit_std.float()).clamp_min(min_tau)


def logit_std(logits: Tensor) -> Tensor:
    """Population std of the finite logits over the last (vocabulary) dim, as the store records it."""
    z = logits.float()
    finite = torch.isfinite(z)
    if bool(finite.all()):
        return z.std(-1, correction=0)
    # -inf marks padded vocabulary rows; they are not part of the distribution's spread
    n = finite.sum(-1).clamp_min(1)
    zf = torch.where(finite, z, torch.zeros_like(z))
    mean = zf.sum(-1) / n
    var = torch.where(finite, (z - mean[:, None]) ** 2, torch.zeros_like(z)).sum(-1) / n
    return var.sqrt()


def wttm_transform(logprobs: Tensor, gamma: float) -> tuple[Tensor, Tensor]:
    """WTTM power transform on the support: q̃ = q^γ / U, U = Σ_j q_j^γ; returns (q̃ [N,K], U [N]).

    q = softmax(logprobs) is the truncated, renormalised teacher distribution; padding stays 0.
    """
    if gamma <= 0:
        raise ConfigError(f"logits.gamma={gamma!r} is out of range; expected gamma > 0")
    log_q = torch.log_softmax(logprobs.float(), -1)
    scaled = gamma * log_q
    log_u = torch.logsumexp(scaled, -1)
    return torch.exp(scaled - log_u[:, None]), torch.exp(log_u)


def adakd_temperature(
    stat: Tensor,
    kind: str,
    tau: float = 1.0,
    beta: float = 1.0,
    tau_min: float | None = None,
    tau_max: float | None = None,
    reference: float | Tensor | None = None,
) -> Tensor:
    """AdaKD per-token teacher temperature (the project's reading; the paper gives no formula).

    SD: τ_t = clip(τ · (σ_t / σ̄)^β, τ_min, τ_max)        σ_t = teacher full logit std
    H:  τ_t = clip(τ · (H̄ / H_t)^β, τ_min, τ_max)        H_t = teacher full entropy (nats)
    x̄ = `reference` (e.g. a running mean kept by the trainer) or, if None, the mean over the given
    tokens. Both make sharp tokens (large spread, low entropy) hotter, flat ones cooler.
    Defaults: β = 1, τ_min = τ/2, τ_max = 2τ. Denominators are clamped at 1e-6.
    """
    if kind not in ("sd", "h"):
        raise choice_error("adakd kind", kind, ["sd", "h"])
    tau_min = tau / 2 if tau_min is None else tau_min
    tau_max = 2 * tau if tau_max is None else tau_max
    if not (0 < tau_min <= tau_max):
        raise ConfigError(f"logits.tau_min={tau_min!r}, tau_max={tau_max!r} are invalid; expected 0 < tau_min <= tau_max")
    s = stat.float()
    ref = s.mean() if reference is None else torch.as_tensor(reference, dtype=torch.float32, device=s.device)
    ratio = s / ref.clamp_min(1e-6) if kind == "sd" else ref / s.clamp_min(1e-6)
    return (tau * ratio.clamp_min(1e-6) ** beta).clamp(tau_min, tau_max)


def normalize_method(method: str) -> str:
    """Canonical adaptive-method name ('AdaKD-SD' -> 'adakd_sd'); ConfigError if unknown."""
    m = str(method).lower().replace("-", "_")
    if m not in METHODS:
        raise choice_error("logits.method", method, METHODS)
    return m


def teacher_targets(
    sparse: SparseLogits,
    p: float,
    k: int,
    tau: float = 1.0,
    method: str = "none",
    store_p: float = 1.0,
    store_k: int | None = None,
    **params: float,
) -> TeacherTargets:
    """Stored entries -> (indices, probs, token_weights, student_tau) for the KD loss.

    Always first narrows to top-p-k (a prefix of the stored entries), then per method:
    - none:     probs = softmax(log q / τ); weights None; student untempered (None), as in the paper's F.
    - normkd:   τ_t = T_norm·σ_t (param t_norm=1.5); probs = softmax(log q / τ_t); weights τ_t²;
                student_tau None -- the loss computes τ_s = std_temperature(z_s.std, T_norm) itself.
                `tau` must be 1 (unused).
    - wttm:     q = softmax(log q / τ); probs = q^γ/U, weights U (param gamma=0.5); student untempered.
    - adakd_sd / adakd_h: probs = softmax(log q / τ_t), τ_t from `adakd_temperature` with base τ
                (params beta, tau_min, tau_max, reference); weights None; student untempered.
    """
    m = normalize_method(method)
    allowed = {"none": set(), "normkd": {"t_norm"}, "wttm": {"gamma"},
               "adakd_sd": {"beta", "tau_min", "tau_max", "reference"},
               "adakd_h": {"beta", "tau_min", "tau_max", "reference"}}[m]
    for name in params:
        if name not in allowed:
            raise choice_error(f"parameter for logits.method={m}", name, sorted(allowed) or ["(none)"])
    if isinstance(tau, (int, float)) and tau <= 0:
        raise ConfigError(f"logits.tau={tau!r} is out of range; expected tau > 0")
    s = narrow(sparse, p, k, store_p=store_p, store_k=store_k)
    lp = s.logprobs
    if m == "none":
        return TeacherTargets(s.indices, apply_temperature(lp, tau), None, None)
    if m == "normkd":
        if not (isinstance(tau, (int, float)) and tau == 1.0):
            raise ConfigError(f"logits.tau={tau!r} is not used by method normkd; expected 1.0")
        tau_t = std_temperature(s.logit_std, params.get("t_norm", 1.5))
        return TeacherTargets(s.indices, apply_temperature(lp, tau_t), tau_t**2, None)
    if m == "wttm":
        base = torch.log(apply_temperature(lp, tau))
        probs, u = wttm_transform(base, params.get("gamma", 0.5))
        return TeacherTargets(s.indices, probs, u, None)
    stat = s.logit_std if m == "adakd_sd" else s.entropy
    if not isinstance(tau, (int, float)):
        raise ConfigError("logits.tau must be a number for AdaKD methods; got a tensor")
    tau_t = adakd_temperature(stat, "sd" if m == "adakd_sd" else "h", tau=float(tau), **params)
    return TeacherTargets(s.indices, apply_temperature(lp, tau_t), None, None)
