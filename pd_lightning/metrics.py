"""Held-out token metrics: loss, calibration, top-1 accuracy and agreement with a teacher — exact and streaming.

Per predicted position t of the held-out stream (N positions in all; position t of a sequence
predicts its token t+1) let z_t be the student's logits over the whole vocabulary V,
p_t = softmax(z_t), y_t the true next token, c_t = max_v p_t[v] the top-1 confidence and
ŷ_t = argmax_v p_t[v] (the lowest index among ties, as torch.argmax); with a teacher, u_t its
logits and q_t = softmax(u_t). All means are over the N positions, logarithms natural:

    loss                = (1/N) Σ_t −log p_t[y_t]                                  nats/token
    top1_acc            = (1/N) Σ_t 1[ŷ_t = y_t]                                   ∈ [0, 1]
    ece                 = Σ_b (n_b/N) · |acc_b − conf_b|                           ∈ [0, 1]
    brier               = (1/N) Σ_t Σ_v (p_t[v] − 1[v = y_t])²
                        = (1/N) Σ_t (Σ_v p_t[v]² − 2·p_t[y_t] + 1)                 ∈ [0, 2]
    teacher_top1_agree  = (1/N) Σ_t 1[ŷ_t = argmax_v q_t[v]]                       ∈ [0, 1]
    teacher_kl          = (1/N) Σ_t Σ_v q_t[v] · (log q_t[v] − log p_t[v])         nats/token, KL(teacher ‖ student)

ECE bin rule (equal-mass, "adaptive" binning; Nguyen & O'Connor 2015, Roelofs et al. 2022): sort
the N pairs (c_t, 1[ŷ_t = y_t]) by confidence, ascending, ties kept in stream order (a stable
sort); bin b = 0..B−1 holds sorted positions [⌊b·N/B⌋, ⌊(b+1)·N/B⌋), so every bin holds ⌊N/B⌋
or ⌈N/B⌉ tokens (when N < B some bins are empty and skipped); conf_b and acc_b are the mean
confidence and the accuracy of bin b, n_b its size. B = 15 by default (`DEFAULT_BINS`). Equal
mass rather than equal width because next-token confidences pile up near 0 and 1: equal-width
bins leave most of the 15 nearly empty and their ECE estimate biased.

The full-vocabulary variant is the Brier score: unlike the ECE, which looks only at the top-1
entry, it scores the whole distribution p_t, the tail included (the part that top-k truncated
targets never train). It is a proper scoring rule: the true distribution minimises its expectation.

KL and agreement are over the full vocabulary: a teacher run live on the same held-out batches
(no store, so no truncation). Student and teacher must have the same vocabulary size.

Streaming: `TokenMetricAccumulator.update` takes one batch's logits at a time and keeps, across the
stream, running sums plus two numbers per token for the ECE (confidence as float32, correctness
as a bool: 5 bytes/token, 5 MB for 256 x 4,096 positions), never a [N, V] array; within a batch
it works in chunks of `chunk` rows, so its temporaries are [chunk, V]. The result equals the pure
functions below applied to the whole stream at once.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

DEFAULT_BINS = 15
DEFAULT_CHUNK = 2048  # rows of [chunk, V] temporaries: 2048 x 151,552 fp32 = 1.2 GB at the GLM-4 vocabulary

# MLflow names of the held-out metrics (`eval.heldout.<name>`) with their direction for sweep objectives.
HELDOUT_PREFIX = "eval.heldout."
HELDOUT_METRICS = {
    "loss": "minimize",
    "top1_acc": "maximize",
    "ece": "minimize",
    "brier": "minimize",
    "teacher_top1_agree": "maximize",
    "teacher_kl": "minimize",
}


# ----------------------------------------------------------------------------------------------
# Pure per-token and whole-array functions


def token_stats(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-token statistics of next-token distributions: logits [N, V], labels [N] -> dict of [N] tensors.

    nll = −log p[y], confidence = max p, correct = 1[argmax p = y] (bool), sq_sum = Σ_v p[v]²,
    p_true = p[y]; computed in float32 (float64 if given) from the logits' log-softmax.
    """
    logp = F.log_softmax(logits.float() if logits.dtype != torch.float64 else logits, dim=-1)
    logp_true = logp.gather(-1, labels[:, None].long()).squeeze(-1)
    top_logp, top = logp.max(dim=-1)
    return {"nll": -logp_true, "confidence": top_logp.exp(), "correct": top == labels,
            "sq_sum": logp.mul(2).exp().sum(-1), "p_true": logp_true.exp()}


def teacher_token_stats(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-token agreement with a teacher: [N, V] logits each -> {"agree": bool [N], "kl": [N]} (KL(q ‖ p), nats).

    Σ_v q_v·(log q_v − log p_v) with q_v·log q_v = 0 where q_v = 0 (a teacher that masks entries).
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student logits {tuple(student_logits.shape)} and teacher logits "
                         f"{tuple(teacher_logits.shape)} must have the same shape [tokens, vocab]")
    logp = F.log_softmax(student_logits.float(), dim=-1)
    logq = F.log_softmax(teacher_logits.float(), dim=-1)
    q = logq.exp()
    kl = torch.where(q > 0, q * (logq - logp), torch.zeros_like(q)).sum(-1)
    return {"agree": student_logits.argmax(-1) == teacher_logits.argmax(-1), "kl": kl}


def reliability_bins(confidence: np.ndarray, correct: np.ndarray, bins: int = DEFAULT_BINS) -> list[dict]:
    """Equal-mass reliability bins (the module's bin rule): [{"conf", "acc", "n"}] for each non-empty bin, by confidence."""
    if bins < 1:
        raise ValueError(f"bins={bins!r} must be a positive integer")
    conf = np.asarray(confidence, dtype=np.float64).reshape(-1)
    hit = np.asarray(correct, dtype=np.float64).reshape(-1)
    if conf.shape != hit.shape:
        raise ValueError(f"confidence {conf.shape} and correct {hit.shape} must have the same length")
    n = conf.size
    order = np.argsort(conf, kind="stable")
    conf, hit = conf[order], hit[order]
    edges = (np.arange(bins + 1) * n) // bins  # ⌊b·N/B⌋, exact in integers
    out = []
    for lo, hi in zip(edges[:-1], edges[1:]):
        if hi > lo:
            out.append({"conf": float(conf[lo:hi].mean()), "acc": float(hit[lo:hi].mean()), "n": int(hi - lo)})
    return out


def ece_from_bins(bins: list[dict]) -> float:
    """Σ_b (n_b/N)·|acc_b − conf_b| over reliability bins (NaN without tokens)."""
    total = sum(b["n"] for b in bins)
    if total == 0:
        return float("nan")
    return float(sum(b["n"] * abs(b["acc"] - b["conf"]) for b in bins) / total)


def ece_equal_mass(confidence: np.ndarray, correct: np.ndarray, bins: int = DEFAULT_BINS) -> float:
    """Expected calibration error of top-1 confidence vs accuracy over equal-mass bins (rule: module docstring)."""
    return ece_from_bins(reliability_bins(confidence, correct, bins))


def brier_score(probs: torch.Tensor, labels: torch.Tensor) -> float:
    """Full-vocabulary Brier score (1/N) Σ_t Σ_v (p_t[v] − 1[v = y_t])² of probabilities [N, V] and labels [N]."""
    onehot = F.one_hot(labels.long(), probs.shape[-1]).to(probs.dtype)
    return float(((probs - onehot) ** 2).sum(-1).mean())


def top1_agreement(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> float:
    """Fraction of positions where student and teacher put their largest logit on the same token."""
    return float((student_logits.argmax(-1) == teacher_logits.argmax(-1)).double().mean())


def kl_teacher_student(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> float:
    """Mean over positions of KL(softmax(teacher) ‖ softmax(student)) over the full vocabulary, in nats."""
    return float(teacher_token_stats(student_logits, teacher_logits)["kl"].double().mean())


# ----------------------------------------------------------------------------------------------
# Streaming


@dataclass
class HeldoutMetrics:
    """The held-out metrics of one model (the teacher fields are None without a teacher); bins: equal-mass reliability bins."""

    loss: float
    top1_acc: float
    ece: float
    brier: float
    tokens: int
    teacher_top1_agree: float | None = None
    teacher_kl: float | None = None
    bins: list[dict] = field(default_factory=list)

    def mlflow_metrics(self) -> dict[str, float]:
        """`eval.heldout.<name>` -> value for every metric this result has (no bins, no token count)."""
        return {HELDOUT_PREFIX + k: float(v) for k, v in asdict(self).items() if k in HELDOUT_METRICS and v is not None}

    def as_dict(self) -> dict:
        """A JSON-ready dict (metrics, token count, bins)."""
        return asdict(self)


class TokenMetricAccumulator:
    """Accumulates `HeldoutMetrics` batch by batch with bounded memory (see the module docstring)."""

    def __init__(self, bins: int = DEFAULT_BINS, chunk: int = DEFAULT_CHUNK):
        if bins < 1:
            raise ValueError(f"bins={bins!r} must be a positive integer")
        self.bins, self.chunk = bins, chunk
        self.n = self.n_teacher = 0
        self.nll = self.correct = self.brier = self.agree = self.kl = 0.0  # float64 running sums
        self._conf: list[np.ndarray] = []
        self._hit: list[np.ndarray] = []

    @torch.no_grad()
    def update(self, logits: torch.Tensor, labels: torch.Tensor, teacher_logits: torch.Tensor | None = None) -> None:
        """Add positions: logits [..., V], labels [...] (the token each position predicts), teacher logits like `logits`."""
        V = logits.shape[-1]
        z, y = logits.reshape(-1, V), labels.reshape(-1)
        u = teacher_logits.reshape(-1, teacher_logits.shape[-1]) if teacher_logits is not None else None
        if u is not None and u.shape != z.shape:
            raise ValueError(f"teacher logits {tuple(teacher_logits.shape)} do not match the student's "
                             f"{tuple(logits.shape)}: student and teacher need the same vocabulary")
        for lo in range(0, z.shape[0], self.chunk):
            s = token_stats(z[lo:lo + self.chunk], y[lo:lo + self.chunk])
            self.n += s["nll"].numel()
            self.nll += float(s["nll"].double().sum())
            self.correct += float(s["correct"].double().sum())
            self.brier += float((s["sq_sum"].double() - 2 * s["p_true"].double() + 1).sum())
            self._conf.append(s["confidence"].float().cpu().numpy())
            self._hit.append(s["correct"].cpu().numpy())
            if u is not None:
                t = teacher_token_stats(z[lo:lo + self.chunk], u[lo:lo + self.chunk])
                self.n_teacher += t["kl"].numel()
                self.agree += float(t["agree"].double().sum())
                self.kl += float(t["kl"].double().sum())

    def result(self) -> HeldoutMetrics:
        """The metrics of every position added so far."""
        if self.n == 0:
            raise ValueError("no positions were added: the held-out stream is empty")
        conf = np.concatenate(self._conf)
        hit = np.concatenate(self._hit)
        bins = reliability_bins(conf, hit, self.bins)
        teacher = self.n_teacher > 0
        return HeldoutMetrics(loss=self.nll / self.n, top1_acc=self.correct / self.n, ece=ece_from_bins(bins),
                              brier=self.brier / self.n, tokens=self.n,
                              teacher_top1_agree=self.agree / self.n_teacher if teacher else None,
                              teacher_kl=self.kl / self.n_teacher if teacher else None, bins=bins)


def format_heldout(m: HeldoutMetrics) -> str:
    """One line: `loss 1.2345 nats/token, top-1 acc 61.2%, ECE 0.0123 (15 equal-mass bins), Brier 0.5432[, ...]`."""
    text = (f"loss {m.loss:.4f} nats/token, top-1 acc {100 * m.top1_acc:.1f}%, ECE {m.ece:.4f} "
            f"({len(m.bins)} equal-mass bins), Brier {m.brier:.4f}")
    if m.teacher_kl is not None:
        text += f", teacher top-1 agreement {100 * m.teacher_top1_agree:.1f}%, KL(teacher ‖ student) {m.teacher_kl:.4f} nats/token"
    return text + f" ({m.tokens:,} tokens)"
