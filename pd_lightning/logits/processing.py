"""Teacher logits processing: top-p-k truncation or sampled targets, temperature, adaptive temperatures.

Everything here is a pure, batched tensor function (no Python loop over tokens).

The store keeps, per token, the top-p-k entries in descending order as τ=1 log-probabilities of
the *full* vocabulary, `log q_i = z_i - logZ`, plus two full-distribution statistics (entropy and
logit std) that cannot be recovered after truncation. Everything a sweep needs is derived from that:

- a narrower truncation `(p', k') <= (p, k)` is a prefix of the stored one (`narrow`);
- a temperature on the support: `softmax(Truncate(z) / τ) = softmax(log q / τ)` on the kept set,
  because `log q = z - logZ` differs from `z` by a per-token constant (`apply_temperature`);
- adaptive methods (NormKD, WTTM, AdaKD-SD, AdaKD-H) use those per-token statistics; WTTM's
  full-vocabulary weight U = Σ_v q_v^γ needs one more, `log Σ_v q_v^a` for each exponent a the store
  was asked to serve (`power_exponents`).

A sampled store (`logits.sampling=sample`) keeps instead the distinct ids of N draws per position from
the τ=1 teacher with their counts (`sample_chunk`); its targets, unbiased for the teacher, come from
`sampled_targets` (formulas in the section comment above `sample_uniforms`).

Precision of the cut: with d = z - max(z) the top entry has d = 0 exactly, so the partition sum is
s = 1 + R with R = Σ_{v ≠ top} exp(d_v) summed on its own (fp32, relative precision ~1e-7 whatever
the logits' magnitude). Log-probabilities are `d - log1p(R)` (never `z - logZ`, whose fp32
subtraction of two numbers of size |z| rounds a confident top-1 log-probability to exactly 0), and
the top-p prefix is decided on float64 probabilities `exp(d) / (1 + R)`. p = 1 is exact by rule:
it keeps min(k, V, #non-zero) entries, no floating sum involved.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

# The method names, the ranges and check_power_exponents are declared with the logits config fields.
from pd_lightning.config import TEMPERATURE_METHODS as METHODS
from pd_lightning.config import check_field, check_power_exponents
from pd_lightning.errors import ConfigError, choice_error


@dataclass
class SparseLogits:
    """Teacher entries for N tokens, descending, padded to K columns: top-p-k, or sampled.

    indices:   [N, K] int64 vocabulary ids (0 in padding columns)
    logprobs:  [N, K] float32 τ=1 log-probabilities of the full vocabulary, descending, -inf padding
    counts:    [N] int64 number of kept entries per token (>= 1)
    entropy:   [N] float32 entropy of the full τ=1 distribution, nats
    logit_std: [N] float32 population std of the full logit vector
    log_power_sums: [N, G] float32 log Σ_v q_v^a of the full τ=1 distribution for each exponent a
                    of `power_exponents` (WTTM's U), or None when G = 0
    power_exponents: the G exponents, ascending (not a tensor: the store's setting)
    draws:     [N, K] int32 for a sampled store (`sample_teacher`): how many of the token's `samples`
               draws fell on each kept id (>= 1 on kept entries, 0 in padding; a row sums to `samples`);
               None for top-p-k entries
    samples:   draws per token of a sampled store (0 for top-p-k)
    """

    indices: Tensor
    logprobs: Tensor
    counts: Tensor
    entropy: Tensor
    logit_std: Tensor
    log_power_sums: Tensor | None = None
    power_exponents: tuple[float, ...] = ()
    draws: Tensor | None = None
    samples: int = 0

    def __len__(self) -> int:
        return int(self.counts.shape[0])

    @property
    def width(self) -> int:
        """K, the number of (padded) columns."""
        return int(self.indices.shape[1])

    @property
    def sampled(self) -> bool:
        """Whether the entries are sampled (draw counts) rather than a top-p-k cut."""
        return self.draws is not None

    def _map(self, fn, columns=None) -> "SparseLogits":
        """The same entries with `fn` applied to every per-token tensor (and `columns` to the [N, K] ones after)."""
        cols = columns or (lambda t: t)
        sums = None if self.log_power_sums is None else fn(self.log_power_sums)
        idx, lp, cnt, ent, std = (fn(t) for t in self._tensors())
        draws = None if self.draws is None else cols(fn(self.draws))
        return SparseLogits(cols(idx), cols(lp), cnt, ent, std, sums, self.power_exponents, draws, self.samples)

    def to(self, device: torch.device | str) -> "SparseLogits":
        """Move every tensor to `device`."""
        return self._map(lambda t: t.to(device))

    def rows(self, start: int, stop: int) -> "SparseLogits":
        """Tokens [start, stop) as a view."""
        return self._map(lambda t: t[start:stop])

    def first_columns(self, width: int) -> "SparseLogits":
        """The first `width` columns (a view; callers keep `counts` <= width)."""
        return self._map(lambda t: t, columns=lambda t: t[:, :width])

    def pad_to(self, width: int) -> "SparseLogits":
        """Pad (never cut) the columns to `width`, keeping the padding convention."""
        extra = width - self.width
        if extra <= 0:
            return self
        n = len(self)
        idx = torch.cat([self.indices, self.indices.new_zeros(n, extra)], 1)
        lp = torch.cat([self.logprobs, self.logprobs.new_full((n, extra), -math.inf)], 1)
        draws = None if self.draws is None else torch.cat([self.draws, self.draws.new_zeros(n, extra)], 1)
        return SparseLogits(idx, lp, self.counts, self.entropy, self.logit_std, self.log_power_sums, self.power_exponents,
                            draws, self.samples)

    @staticmethod
    def cat(parts: "list[SparseLogits]") -> "SparseLogits":
        """Concatenate along tokens, padding to the widest part (every part must carry the same exponents and
        sampling)."""
        width = max(p.width for p in parts)
        parts = [p.pad_to(width) for p in parts]
        exps = parts[0].power_exponents
        if any(p.power_exponents != exps for p in parts):
            raise ValueError("cannot concatenate SparseLogits with different power_exponents")
        if any((p.samples, p.sampled) != (parts[0].samples, parts[0].sampled) for p in parts):
            raise ValueError("cannot concatenate sampled and top-p-k SparseLogits, or different sample counts")
        sums = torch.cat([p.log_power_sums for p in parts], 0) if exps else None
        draws = torch.cat([p.draws for p in parts], 0) if parts[0].sampled else None
        return SparseLogits(*(torch.cat(ts, 0) for ts in zip(*(p._tensors() for p in parts))), sums, exps, draws,
                            parts[0].samples)

    def _tensors(self) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        return self.indices, self.logprobs, self.counts, self.entropy, self.logit_std


class TeacherTargets(NamedTuple):
    """What the KD loss needs per token (see `teacher_targets`)."""

    indices: Tensor  # [N, K'] int64 vocabulary ids, 0 in padding
    probs: Tensor  # [N, K'] float32 teacher probabilities on the support, 0 in padding, rows sum to 1
    token_weights: Tensor | None  # [N] per-token loss weight (NormKD τ_t², WTTM U) or None
    student_tau: Tensor | None  # [N] student temperature, or None (untempered; NormKD: see docstring)
    # [N, K'] log of the teacher probability each target estimates (sampled stores: log p_τ(v), so the KL
    # value Σ t (log p_τ - log s) is unbiased, which Σ t log(t / s) is not); None: the targets are exact
    log_target: Tensor | None = None


def _check_p_k(p: float, k: int) -> None:
    check_field("logits.p", float(p))
    check_field("logits.k", k)


def _prefix_counts(logprobs: Tensor, p: float) -> Tensor:
    """Per row: the smallest n with Σ_{j<n} q_j >= p, i.e. #{j : Σ_{i<j} q_i < p} (descending rows).

    Only finite entries count (-inf marks padding and masked vocabulary). p >= 1 keeps every finite
    entry by rule: a float sum of probabilities falls short of 1 or reaches it early, by rounding.
    For p < 1 the sum runs in float64 on the (accurate, see the module docstring) log-probabilities,
    so the stored and the dense inputs decide the boundary the same way.
    """
    finite = (logprobs > -math.inf).sum(-1)
    if p >= 1.0:
        return finite.clamp_min(1)
    q = logprobs.double().exp()
    before = torch.cumsum(q, -1) - q
    return torch.minimum((before < p).sum(-1), finite).clamp_min(1)


def _full_stats(
    z: Tensor, top1: Tensor, top1_idx: Tensor, work: Tensor, exponents: tuple[float, ...] = (), z_scratch: bool = False
) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """(log s, entropy, population std, log power sums) of each row of logits z [n, V].

    top1 [n, 1] is the row max, top1_idx [n, 1] its column; s = Σ_v exp(z_v - max) = 1 + R, so
    logZ = max + log s. With d = z - max (exactly 0 at the argmax) and e = exp(d):
      R = Σ_{v ≠ argmax} e_v           summed without the 1, so its digits survive (log1p(R) = log s)
      H = log s - Σ_v (e_v / s) d_v     (= logZ - Σ q z, without the two large terms that cancel)
      std: two-pass, on c = z - mean(z) (E[c²] - E[c]² with E[c] ≈ 0 keeps its digits on peaked rows,
           where the one-pass E[d²] - E[d]² of d = z - max cancelled ~|max - mean|² against itself)
      log Σ_v q_v^a = log1p(Σ_{v ≠ argmax} exp(a·d_v)) - a·log s   for each exponent a (WTTM's U)
    `work` is a reused [2, >= n, V] buffer: fresh chunk-sized temporaries would page-fault on every
    chunk, which costs more than the arithmetic on CPU. `z_scratch`: z may be overwritten (it then
    holds d, the same values computed in place), and `work` needs only [1, >= n, V].
    """
    n, vocab = z.shape
    d, e = (z if z_scratch else work[0, :n]), work[-1, :n]
    rows = torch.arange(n, device=z.device)
    col = top1_idx[:, 0]
    masked = not bool(torch.isfinite(top1).all()) or bool((z.amin(-1) == -math.inf).any())
    if masked:  # -inf marks padded vocabulary rows: they are not part of the distribution
        std = logit_std(z)
        torch.sub(z, top1, out=d)
        d.nan_to_num_(nan=-math.inf)  # an all -inf row: -inf - -inf
    else:
        mean_z = z.mean(-1, keepdim=True)
        c = torch.sub(z, mean_z, out=d)
        mean_c = c.sum(-1) / vocab
        # vector_norm's reduction keeps ~1e-7 relative (a BLAS dot product here: ~3e-6)
        sq = torch.linalg.vector_norm(c, dim=-1).square() / vocab
        std = (sq - mean_c * mean_c).clamp_min(0).sqrt()
        d.sub_(top1 - mean_z)  # the same rounding as the argmax's own c: d is exactly 0 there
    torch.exp(d, out=e)
    e[rows, col] = 0.0
    log_s = torch.log1p(e.sum(-1))
    if masked:
        d.masked_fill_(e == 0, 0.0)  # 0 · -inf would be NaN; those entries carry no mass
    entropy = log_s - (e.unsqueeze(1) @ d.unsqueeze(2)).reshape(-1) / torch.exp(log_s)
    sums = None
    if exponents:
        cols = []
        for a in exponents:
            torch.mul(d, float(a), out=e)
            e.exp_()
            if masked:
                e.masked_fill_(d == 0, 0.0)  # the masked entries zeroed above (and the argmax, d = 0)
            e[rows, col] = 0.0
            cols.append(torch.log1p(e.sum(-1)) - float(a) * log_s)
        sums = torch.stack(cols, -1)
    return log_s, entropy, std, sums


def truncate_top_p_k(
    logits: Tensor, p: float, k: int, chunk_tokens: int | None = None, power_exponents: tuple[float, ...] = ()
) -> SparseLogits:
    """Top-p-k of dense logits [..., V] -> SparseLogits over the flattened tokens.

    q = softmax(z) (τ=1); sort q descending; keep the smallest prefix with Σ q >= p; keep at most k
    (p = 1: min(k, #finite) entries). Log-probabilities are `(z - max) - log s` in float64, rounded
    once to float32 (see the module docstring). Also returns H = logZ - Σ_i q_i z_i (full-distribution
    entropy), std(z) (population std) and, for each of `power_exponents`, log Σ_v q_v^a.
    Works in chunks of `chunk_tokens` rows (default 64 on CPU, cache-friendly; 1024 on accelerators,
    fewer launches) so temporaries stay at 2 × chunk × V.
    """
    _check_p_k(p, k)
    exponents = check_power_exponents(power_exponents)
    if chunk_tokens is None:
        chunk_tokens = 64 if logits.device.type == "cpu" else 1024
    vocab = logits.shape[-1]
    z_all = logits.reshape(-1, vocab)
    kk = min(int(k), vocab)
    parts = []
    work = torch.empty(2, min(chunk_tokens, max(z_all.shape[0], 1)), vocab, device=logits.device)
    for start in range(0, max(z_all.shape[0], 1), chunk_tokens):
        parts.append(truncate_chunk(z_all[start : start + chunk_tokens].float(), p, kk, work, exponents))
    return parts[0] if len(parts) == 1 else SparseLogits.cat(parts)


def truncate_chunk(z: Tensor, p: float, kk: int, work: Tensor, exponents: tuple[float, ...] = (),
                   z_scratch: bool = False) -> SparseLogits:
    """One chunk of `truncate_top_p_k`: fp32 logits z [n, V] -> SparseLogits of width kk = min(k, V).

    `work` is a reused [2, >= n, V] fp32 buffer on z's device ([1, >= n, V] with `z_scratch`, which
    lets the statistics overwrite z: same results, one buffer less); p, kk and the (checked, ascending)
    exponents are taken as given. Rows are independent except that a chunk holding a -inf logit
    takes the masked statistics path as a whole, so callers that must match `truncate_top_p_k`
    bit for bit group rows the same way (chunks of `chunk_tokens` from the first row).
    """
    top, idx = torch.topk(z, kk, dim=-1, largest=True, sorted=True)
    log_s, entropy, std, sums = _full_stats(z, top[:, :1], idx[:, :1], work, exponents, z_scratch)
    # the difference of two float32 numbers is exact in float64: the top-1 keeps its -log s
    lp = ((top.double() - top[:, :1].double()) - log_s.double()[:, None]).float()
    counts = _prefix_counts(lp, p)
    keep = torch.arange(kk, device=z.device)[None, :] < counts[:, None]
    lp = torch.where(keep, lp, torch.full_like(lp, -math.inf))
    idx = torch.where(keep, idx, torch.zeros_like(idx))
    return SparseLogits(idx.long(), lp, counts.long(), entropy, std, sums, exponents)


def narrow(sparse: SparseLogits, p: float, k: int, store_p: float = 1.0, store_k: int | None = None) -> SparseLogits:
    """Derive top-p'-k' from stored top-p-k entries (p' <= p, k' <= k): a prefix of each row.

    count' = min(k', count, #{j : Σ_{i<j} q_i < p'}) with q the stored τ=1 full-vocabulary
    probabilities -- the same numbers a dense computation would use, so the result is identical.
    Columns are cut to min(k', K).
    """
    _check_p_k(p, k)
    if sparse.sampled:
        raise ConfigError("logits.p/logits.k: a sampled store (logits.sampling=sample) keeps drawn ids, not a top-p-k "
                          "prefix; its targets come from `sampled_targets`")
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
    return SparseLogits(idx, lp, counts, sparse.entropy, sparse.logit_std, sparse.log_power_sums, sparse.power_exponents)


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
    check_field("logits.normkd_t", float(t_norm))
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
    """WTTM power transform on the support: q̃ = q^γ / U_S, U_S = Σ_{j∈S} q_j^γ; returns (q̃ [N,K], U_S [N]).

    q = softmax(logprobs) is the truncated, renormalised teacher distribution; padding stays 0.
    U_S is the *support* weight (`logits.wttm_weight=support`); the original method's weight sums
    over the whole vocabulary (`wttm_full_weight`).
    """
    check_field("logits.wttm_gamma", float(gamma))
    log_q = torch.log_softmax(logprobs.float(), -1)
    scaled = gamma * log_q
    log_u = torch.logsumexp(scaled, -1)
    return torch.exp(scaled - log_u[:, None]), torch.exp(log_u)


def wttm_exponents(gamma: float, tau: float = 1.0) -> tuple[float, ...]:
    """The exponents a of log Σ_v q_v^a (q the τ=1 teacher) that WTTM's full-vocabulary U needs at (γ, τ).

    U = Σ_v softmax(z/τ)_v^γ = Σ_v q_v^{γ/τ} / (Σ_v q_v^{1/τ})^γ, so a ∈ {γ/τ} ∪ {1/τ if τ ≠ 1}
    (a = 1 is free: log Σ q = 0).
    """
    return tuple(sorted({float(gamma) / float(tau)} | ({1.0 / float(tau)} if float(tau) != 1.0 else set())))


def needed_power_exponents(method: str, gamma: float, tau: float, weight: str = "full") -> tuple[float, ...]:
    """The power sums a store must keep to serve a method's targets: WTTM's full weight needs `wttm_exponents`."""
    if normalize_method(method) != "wttm" or weight != "full":
        return ()
    return tuple(a for a in wttm_exponents(gamma, tau) if a != 1.0)


def power_exponents_for(lg) -> tuple[float, ...]:
    """Exponents a store generated for a logits config keeps: `store_power_exponents` ∪ what its method needs."""
    need = needed_power_exponents(lg.method, lg.wttm_gamma, lg.tau, lg.wttm_weight)
    need += sampled_power_exponents(lg.sampling, lg.method, lg.tau, lg.sampled_tau)
    return check_power_exponents(list(lg.store_power_exponents or ()) + list(need))


def missing_power_exponents(lg, kept) -> list[float]:
    """Exponents the config's targets need that a store keeping `kept` lacks (empty: it serves them)."""
    need = needed_power_exponents(lg.method, lg.wttm_gamma, lg.tau, lg.wttm_weight)
    need += sampled_power_exponents(lg.sampling, lg.method, lg.tau, lg.sampled_tau)
    return [a for a in need if not any(abs(a - b) <= 1e-9 * max(1.0, a) for b in kept)]


def _power_sum(sparse: SparseLogits, a: float, why: str = "logits.method=wttm",
               instead: str = "or set logits.wttm_weight=support") -> Tensor:
    if abs(a - 1.0) < 1e-12:
        return torch.zeros_like(sparse.entropy)
    for j, b in enumerate(sparse.power_exponents):
        if abs(a - b) <= 1e-9 * max(1.0, abs(a)):
            return sparse.log_power_sums[:, j].float()
    raise ConfigError(
        f"{why} needs log Σ q^{a:g} per token, which this logit store does not keep (it keeps "
        f"{list(sparse.power_exponents) or 'none'}); regenerate it with logits.store_power_exponents=[{a:g}] "
        f"{instead}")


def wttm_full_weight(sparse: SparseLogits, gamma: float, tau: float = 1.0) -> Tensor:
    """WTTM's U = Σ_{v∈V} softmax(z/τ)_v^γ over the whole vocabulary, per token [N], from the store's power sums.

    log U = S(γ/τ) - γ·S(1/τ) with S(a) = log Σ_v q_v^a of the τ=1 teacher (`wttm_exponents`).
    """
    check_field("logits.wttm_gamma", float(gamma))
    return torch.exp(_power_sum(sparse, gamma / tau) - gamma * _power_sum(sparse, 1.0 / tau))


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



# ----------------------------------------------------------------------------- sampled targets
#
# Random-sampling KD (Anshumann et al., "Sparse Logit Sampling", ACL 2025, arXiv 2503.16870), with its
# proposal q = the teacher at τ = 1: per position, N ids x_1..x_N are drawn with replacement from the
# teacher's τ=1 distribution p, and the store keeps the distinct ids with their draw counts c_v
# (Σ_v c_v = N) and their τ=1 log-probabilities log p_v. The target t_v = c_v / N is the empirical
# distribution of the draws, so E[t_v] = p_v. Every KD gradient used here is linear in the target,
# ∇_z CE(t, s) = (Σ_v t_v)·s - t, hence E[∇_z CE(t, s)] = s - p = ∇_z KL(p ‖ s): the sampled gradient is
# unbiased for the full-vocabulary gradient at every z, with per-token covariance (diag(p) - p pᵀ)/N.
# The KL value is estimated by Σ_v t_v (log p_v - log s_v) with the stored log p_v (unbiased); the
# plug-in Σ t log(t / s) is biased (its entropy term), so the loss takes `log_target` for it.
# At a KD temperature τ ≠ 1 the target is p_τ(v) = p_v^a / Z_a, a = 1/τ, Z_a = Σ_v p_v^a; from the
# same τ=1 draws (importance sampling, weight w_v = p_τ(v) / p_v):
#   exact            t_v = (c_v / N) · exp((a - 1) log p_v - log Z_a), Z_a from the store's power sums:
#                    unbiased (E[t_v] = p_τ(v)); Σ_v t_v is 1 only in expectation, which the loss's
#                    gradient (Σ t)·s - t handles exactly;
#   self_normalised  t_v = c_v w_v / Σ_u c_u w_u with w_v ∝ p_v^(a-1): needs no Z (so per-token τ, AdaKD,
#                    can use it); consistent, biased by O(1/N) (mass moves away from high-weight ids).
# The effective sample size is N / (1 + χ²(p_τ ‖ p)): a τ=1 store serves τ in about [0.7, 1.2] well.


def sample_uniforms(seed: int, sequences: Sequence[int], positions: int, samples: int) -> np.ndarray:
    """[len(sequences)·positions, samples] float64 uniforms in [0, 1), sequence-major.

    Counter-based (numpy's Philox keyed by (seed, sequence id)): position t of sequence i always gets the
    same draws whatever the batch, rank, chunk or resume, so a resumed store is byte-identical.
    """
    out = np.empty((len(sequences), positions, samples), np.float64)
    for row, seq in enumerate(sequences):
        key = (int(seed) << 64) | int(seq)  # Philox takes a 128-bit key
        np.random.Generator(np.random.Philox(key=key)).random(out=out[row])
    return out.reshape(-1, samples)


def sample_chunk(z: Tensor, uniforms: Tensor, work: Tensor, exponents: tuple[float, ...] = (),
                 z_scratch: bool = False, block_rows: int = 256) -> SparseLogits:
    """Draw `samples` ids per row of fp32 logits z [n, V] from softmax(z) with uniforms [n, samples] in [0, 1).

    Inverse CDF on a float64 cumulative sum of exp(z - max) (absolute error ~V·1e-16, far below any tail
    probability that matters; an fp32 cumsum over V = 151,552 would err by ~1e-5, the size of the tail
    itself), `block_rows` rows at a time so the [rows, V] float64 buffer stays bounded. An id whose
    probability is 0 (-inf logit) is never drawn. Returns the distinct ids per row with their draw counts
    (`draws`) and τ=1 log-probabilities (the top-p-k path's formula), descending by log-probability, ties
    by id, padded to `samples` columns; the full-distribution statistics as `truncate_chunk` computes them.
    `work` / `z_scratch` as for `truncate_chunk` (z is read before the statistics may overwrite it).
    """
    n, vocab = z.shape
    samples = int(uniforms.shape[1])
    top1, top1_idx = z.max(-1, keepdim=True)
    drawn = torch.empty(n, samples, dtype=torch.long, device=z.device)
    u = uniforms.to(device=z.device, dtype=torch.float64)
    for s in range(0, n, block_rows):
        e = min(s + block_rows, n)
        cdf = (z[s:e].double() - top1[s:e].double()).exp_().cumsum_(-1)
        total = cdf[:, -1:]
        # u < 1, but u·total can round up to total: keep the target strictly below the last cdf value
        target = torch.minimum(u[s:e] * total, torch.nextafter(total, torch.zeros_like(total)))
        drawn[s:e] = torch.searchsorted(cdf, target, right=True)
        del cdf
    ids_sorted = torch.sort(drawn, -1).values
    new = torch.ones_like(ids_sorted, dtype=torch.bool)
    new[:, 1:] = ids_sorted[:, 1:] != ids_sorted[:, :-1]
    group = new.cumsum(-1) - 1  # the distinct id's column, 0..U-1
    counts = new.sum(-1)
    draws = torch.zeros(n, samples, dtype=torch.int32, device=z.device)
    draws.scatter_add_(1, group, torch.ones_like(group, dtype=torch.int32))
    uid = torch.zeros(n, samples, dtype=torch.long, device=z.device).scatter_(1, group, ids_sorted)
    z_at = z.gather(1, uid)  # before the statistics may overwrite z
    log_s, entropy, std, sums = _full_stats(z, top1, top1_idx, work, exponents, z_scratch)
    kept = torch.arange(samples, device=z.device)[None, :] < counts[:, None]
    lp = ((z_at.double() - top1.double()) - log_s.double()[:, None]).float()
    lp = torch.where(kept, lp, torch.full_like(lp, -math.inf))
    order = torch.sort(lp, stable=True, dim=-1, descending=True).indices  # ids ascend within a row: ties by id
    idx = torch.where(kept, uid, 0).gather(1, order)
    return SparseLogits(idx, lp.gather(1, order), counts.long(), entropy, std, sums, exponents,
                        draws.gather(1, order), samples)


def sample_teacher(logits: Tensor, uniforms: Tensor, chunk_tokens: int | None = None,
                   power_exponents: tuple[float, ...] = ()) -> SparseLogits:
    """Sampled entries of dense logits [..., V] over the flattened tokens (uniforms [tokens, samples]); see
    `sample_chunk`. The reference the generator's chunked path reproduces (same chunks as `truncate_top_p_k`)."""
    exponents = check_power_exponents(power_exponents)
    if chunk_tokens is None:
        chunk_tokens = 64 if logits.device.type == "cpu" else 1024
    vocab = logits.shape[-1]
    z_all = logits.reshape(-1, vocab)
    if uniforms.shape[0] != z_all.shape[0]:
        raise ValueError(f"{uniforms.shape[0]} rows of uniforms for {z_all.shape[0]} tokens")
    work = torch.empty(2, min(chunk_tokens, max(z_all.shape[0], 1)), vocab, device=logits.device)
    parts = [sample_chunk(z_all[a : a + chunk_tokens].float(), uniforms[a : a + chunk_tokens], work, exponents)
             for a in range(0, max(z_all.shape[0], 1), chunk_tokens)]
    return parts[0] if len(parts) == 1 else SparseLogits.cat(parts)


def sampled_power_exponents(sampling: str, method: str, tau: float, estimator: str) -> tuple[float, ...]:
    """The power sum a sampled store keeps for its exact τ ≠ 1 targets: a = 1/τ (none otherwise)."""
    if sampling != "sample" or estimator != "exact" or normalize_method(method) != "none" or float(tau) == 1.0:
        return ()
    return (1.0 / float(tau),)


def sampled_targets(sparse: SparseLogits, tau: float | Tensor = 1.0, estimator: str = "exact") -> TeacherTargets:
    """Sampled entries -> KD targets t [N, K] and log p_τ [N, K] (section comment above for the formulas).

    τ = 1: t = c / N, exact. τ ≠ 1 (a float, or per token [N] for AdaKD): `estimator` exact (needs the
    store's power sum at 1/τ; a float τ only) or self_normalised. No token weights, student untempered.
    """
    if not sparse.sampled:
        raise ValueError("sampled_targets needs sampled entries (SparseLogits.draws)")
    check_field("logits.sampled_tau", estimator)
    kept = sparse.draws > 0
    freq = sparse.draws.float() / float(sparse.samples)  # c / N, 0 in padding
    lp = torch.where(kept, sparse.logprobs, 0.0)
    if isinstance(tau, (int, float)) and float(tau) == 1.0:
        return TeacherTargets(sparse.indices, freq, None, None, torch.where(kept, sparse.logprobs, -math.inf))
    a = 1.0 / _per_token(tau, sparse.entropy)  # [N, 1] or a scalar
    if estimator == "exact":
        if not isinstance(tau, (int, float)):
            raise ConfigError("logits.sampled_tau='exact' needs one fixed logits.tau; per-token temperatures need "
                              "logits.sampled_tau=self_normalised")
        log_z = _power_sum(sparse, 1.0 / float(tau), why=f"logits.sampled_tau=exact at logits.tau={float(tau):g}",
                           instead="or set logits.sampled_tau=self_normalised")[:, None]
    else:  # Ẑ_a = Σ_v (c_v / N) p_v^(a-1) estimates Z_a = E_p[p^(a-1)]: the weights' own normaliser
        log_z = torch.logsumexp(torch.where(kept, freq.log() + (a - 1.0) * lp, -math.inf), -1, keepdim=True)
    log_target = a * lp - log_z
    probs = torch.where(kept, freq * torch.exp((a - 1.0) * lp - log_z), 0.0)
    return TeacherTargets(sparse.indices, probs, None, None, torch.where(kept, log_target, -math.inf))


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
    sampled_tau: str = "exact",
    **params: float,
) -> TeacherTargets:
    """Stored entries -> (indices, probs, token_weights, student_tau) for the KD loss.

    Sampled entries (a store made with logits.sampling=sample) go to `sampled_targets` (p, k unused; method
    none, or adakd_* whose per-token τ_t then needs sampled_tau=self_normalised). Top-p-k entries are
    first narrowed to top-p-k (a prefix of the stored entries), then per method:
    - none:     probs = softmax(log q / τ); weights None; student untempered (None), as in the paper's F.
    - normkd:   τ_t = T_norm·σ_t (param t_norm=1.5); probs = softmax(log q / τ_t); weights τ_t²;
                student_tau None -- the loss computes τ_s = std_temperature(z_s.std, T_norm) itself.
                `tau` must be 1 (unused).
    - wttm:     q = softmax(log q / τ); probs = q^γ/U_S on the support (param gamma=0.5); weights U,
                the whole vocabulary's Σ_v softmax(z/τ)_v^γ as in WTTM (param weight="full", needs the
                store's power sums, `wttm_full_weight`) or the support's U_S (weight="support", a
                departure: 1 for a token cut to one entry); student untempered.
    - adakd_sd / adakd_h: probs = softmax(log q / τ_t), τ_t from `adakd_temperature` with base τ
                (params beta, tau_min, tau_max, reference); weights None; student untempered.
    """
    m = normalize_method(method)
    allowed = {"none": set(), "normkd": {"t_norm"}, "wttm": {"gamma", "weight"},
               "adakd_sd": {"beta", "tau_min", "tau_max", "reference"},
               "adakd_h": {"beta", "tau_min", "tau_max", "reference"}}[m]
    for name in params:
        if name not in allowed:
            raise choice_error(f"parameter for logits.method={m}", name, sorted(allowed) or ["(none)"])
    if isinstance(tau, (int, float)):
        check_field("logits.tau", tau)
    if sparse.sampled:  # draws, not a top-p-k prefix: p and k do not apply
        if m in ("normkd", "wttm"):
            raise ConfigError(f"logits.method={m!r} is not defined on sampled targets; allowed: none, adakd_sd, adakd_h")
        if m != "none":
            stat = sparse.logit_std if m == "adakd_sd" else sparse.entropy
            tau = adakd_temperature(stat, "sd" if m == "adakd_sd" else "h", tau=float(tau), **params)
        return sampled_targets(sparse, tau, sampled_tau)
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
        gamma, weight = params.get("gamma", 0.5), params.get("weight", "full")
        check_field("logits.wttm_weight", weight)
        if not isinstance(tau, (int, float)):
            raise ConfigError("logits.tau must be a number for WTTM; got a tensor")
        base = torch.log(apply_temperature(lp, tau))
        probs, u = wttm_transform(base, gamma)
        if weight == "full":
            u = wttm_full_weight(s, gamma, float(tau))
        return TeacherTargets(s.indices, probs, u, None)
    stat = s.logit_std if m == "adakd_sd" else s.entropy
    if not isinstance(tau, (int, float)):
        raise ConfigError("logits.tau must be a number for AdaKD methods; got a tensor")
    tau_t = adakd_temperature(stat, "sd" if m == "adakd_sd" else "h", tau=float(tau), **params)
    return TeacherTargets(s.indices, apply_temperature(lp, tau_t), None, None)
