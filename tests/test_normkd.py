"""NormKD through the training step (`DistillationModule.compute_loss`) against the method written out.

Chi et al. 2023, per token, std = population std over the vocabulary:

    L_kd = τ_t² · KL(softmax(z_t/τ_t) ‖ softmax(z_s/τ_s)),   τ_t = T·std(z_t),   τ_s = T·std(z_s)

with τ_s inside the autograd graph (the authors' code). On a truncated support S the teacher is
softmax(z_t[S]/τ_t) and the KL runs over S, as the lab feeds it from the store.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from pd_lightning.config import LossConfig, OptimConfig
from pd_lightning.errors import ConfigError
from pd_lightning.logits.processing import teacher_targets, truncate_top_p_k
from pd_lightning.module import DistillationModule

F64 = torch.float64
T_NORM = 1.5
N_TOK, V = 6, 50


class FixedLogits(torch.nn.Module):
    """A stand-in causal LM whose logits [1, N+1, V] are one leaf: after backward, .grad = dL/dz_s."""

    def __init__(self, z: torch.Tensor):
        super().__init__()
        self.z = torch.nn.Parameter(z)

    def forward(self, input_ids: torch.Tensor) -> SimpleNamespace:
        return SimpleNamespace(logits=self.z)


def make_batch(seed: int, p: float, k: int) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """(student logits [1, N+1, V], teacher logits [N, V], the batch the DataModule would build)."""
    g = torch.Generator().manual_seed(seed)
    z_s = torch.randn(1, N_TOK + 1, V, generator=g, dtype=F64) * 2
    z_t = torch.randn(N_TOK, V, generator=g, dtype=F64) * 3
    ids = torch.randint(0, V, (1, N_TOK + 1), generator=g)
    target = teacher_targets(truncate_top_p_k(z_t.float(), p, k), p, k, 1.0, "normkd", p, k, t_norm=T_NORM)
    batch = {"input_ids": ids, "teacher_indices": target.indices.to(torch.int32), "teacher_probs": target.probs,
             "token_weights": target.token_weights}
    return z_s, z_t, batch


def textbook_teacher(z_t: torch.Tensor, support: torch.Tensor,
                     probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(q [N, K], τ_t² [N]) in float64 from the teacher's logits: q = softmax(z_t[S]/τ_t) on S, 0 off it."""
    tau_t = T_NORM * z_t.std(-1, correction=0)
    on = probs > 0
    u = torch.where(on, z_t.gather(1, support.long()) / tau_t[:, None], float("-inf"))
    return torch.softmax(u, -1), tau_t**2


def normkd_reference(z_s: torch.Tensor, support: torch.Tensor, q: torch.Tensor, tau_t_sq: torch.Tensor,
                     detach_tau_s: bool = False) -> torch.Tensor:
    """mean_t τ_t² Σ_{i∈S_t} q_i (log q_i - log softmax(z_s/τ_s)_i), τ_s = T·std(z_s); dense, row by row."""
    tau_s = T_NORM * z_s.std(-1, correction=0, keepdim=True)
    log_p = torch.log_softmax(z_s / (tau_s.detach() if detach_tau_s else tau_s), -1)
    rows = []
    for r in range(z_s.shape[0]):
        on = q[r] > 0
        s, qs = support[r][on].long(), q[r][on]
        rows.append(tau_t_sq[r] * (qs * (qs.log() - log_p[r, s])).sum())
    return torch.stack(rows).mean()


def reference_grads(z_s: torch.Tensor, z_t: torch.Tensor, batch: dict, detach_tau_s: bool = False):
    """{teacher source: (loss, dL/dz_s)}: "store" = the batch's own q and τ_t² (float32, upcast), "textbook"
    = q and τ_t recomputed in float64 from z_t (differs from "store" by the store's float32 rounding)."""
    idx, probs = batch["teacher_indices"], batch["teacher_probs"]
    teachers = {"store": (probs.to(F64), batch["token_weights"].to(F64)),
                "textbook": textbook_teacher(z_t, idx, probs)}
    out = {}
    for name, (q, tau_t_sq) in teachers.items():
        zs = z_s[0, :-1].clone().requires_grad_()
        ref = normkd_reference(zs, idx, q, tau_t_sq, detach_tau_s)
        out[name] = (ref.detach(), torch.autograd.grad(ref, zs)[0])
    return out


def assert_matches(loss: torch.Tensor, grad: torch.Tensor, refs: dict) -> None:
    """Tight (float64) against the store's teacher; 1e-5 of the largest entry against the textbook one."""
    torch.testing.assert_close(grad, refs["store"][1], rtol=1e-10, atol=1e-15)
    g = refs["textbook"][1]
    torch.testing.assert_close(grad, g, rtol=1e-5, atol=1e-5 * float(g.abs().max()))
    torch.testing.assert_close(loss, refs["store"][0], rtol=1e-12, atol=0)
    torch.testing.assert_close(loss, refs["textbook"][0], rtol=1e-5, atol=0)


def module_grad(z_s: torch.Tensor, batch: dict, chunk: int, mode: str | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, dL/dz_s [N, V]) from the LightningModule's own loss computation at α = 1."""
    model = FixedLogits(z_s.clone())
    kw = {} if mode is None else {"normkd_student_tau": mode}
    module = DistillationModule(model, loss=LossConfig(kind="kld", alpha=1.0, chunk_size=chunk), optim=OptimConfig(),
                                max_steps=1, normkd_t=T_NORM, **kw)
    out = module.compute_loss(batch, alpha=1.0)
    out.loss.backward()
    assert torch.count_nonzero(model.z.grad[0, -1]) == 0  # the last position predicts nothing
    return out.loss.detach(), model.z.grad[0, :-1]


SUPPORTS = [pytest.param(1.0, V, id="full-support"), pytest.param(0.9, 10, id="top-p-k")]


@pytest.mark.parametrize(("p", "k"), SUPPORTS)
@pytest.mark.parametrize("chunk", [1, 4, 1024])
def test_normkd_gradient_flows_through_the_student_temperature(p, k, chunk):
    z_s, z_t, batch = make_batch(0, p, k)
    loss, grad = module_grad(z_s, batch, chunk, mode=None)  # the default is the method
    assert_matches(loss, grad, reference_grads(z_s, z_t, batch))


@pytest.mark.parametrize(("p", "k"), SUPPORTS)
def test_normkd_detached_option_is_the_constant_student_temperature(p, k):
    z_s, z_t, batch = make_batch(1, p, k)
    loss, grad = module_grad(z_s, batch, 4, mode="detached")
    assert_matches(loss, grad, reference_grads(z_s, z_t, batch, detach_tau_s=True))
    # Same loss as the method, another gradient: that is what makes it a departure.
    graph_loss, graph_grad = module_grad(z_s, batch, 4, mode="graph")
    torch.testing.assert_close(loss, graph_loss, rtol=1e-12, atol=0)
    assert torch.nn.functional.cosine_similarity(grad.flatten(), graph_grad.flatten(), 0) < 0.99


def test_normkd_with_fused_loss_is_refused_in_one_line():
    z_s, _, batch = make_batch(2, 0.9, 10)
    module = DistillationModule(FixedLogits(z_s), loss=LossConfig(alpha=1.0, fused=True), optim=OptimConfig(),
                                max_steps=1, normkd_t=T_NORM)
    with pytest.raises(ConfigError, match="loss.fused=true cannot be combined with logits.method='normkd'") as e:
        module.compute_loss(batch, alpha=1.0)
    assert "\n" not in str(e.value)
