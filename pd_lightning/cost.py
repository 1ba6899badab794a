"""Compute and storage cost of a run: FLOPs of student and teacher, and steps for a fixed budget.

FLOP convention (Kaplan et al. 2020, "Scaling Laws for Neural Language Models", Table 1; the
convention Chinchilla's `C ≈ 6ND` rests on):

* forward pass, per token:  `2·N + 2·n_layers·seq_len·d_model`
* training (forward + backward = 3 × forward), per token:  `6·N + 6·n_layers·seq_len·d_model`

`N` is the non-embedding parameter count (every weight except the token-embedding matrix and,
when it is not tied, the LM head). The second term is attention over the context (QKᵀ scores and
their application to V, counted once at the full `seq_len` as Kaplan does, not halved for the
causal mask). Not counted, as in Kaplan: the embedding lookup, the LM head's `2·d_model·vocab`
per token, softmax, norms and the KD loss. At the paper's sizes the head is a few percent of `N`;
for the tiny CPU presets it is large (tiny-1m at a 2,048-token vocabulary: 0.26M head weights
beside N = 0.79M), so tiny-scale absolute FLOPs are an undercount — comparisons between runs, which
share the convention, are not affected. Tokens are the tokens the model is run on (`seq_len` per
sequence), for the teacher as for the student.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pd_lightning.errors import ConfigError, choice_error

FLOP_CONVENTION = "kaplan2020: train 6N+6·L·T·d, forward 2N+2·L·T·d per token; N non-embedding"
BUDGET_KINDS = ("none", "tokens", "flops", "wall")


@dataclass(frozen=True)
class CostShape:
    """What the FLOP formulas need to know about a decoder: N (non-embedding), layers, width."""

    non_embedding_params: int
    n_layers: int
    d_model: int

    def training_flops(self, seq_len: int, tokens: float) -> float:
        """Forward + backward FLOPs of training on `tokens` tokens in sequences of `seq_len`."""
        return training_flops(self.non_embedding_params, self.n_layers, self.d_model, seq_len, tokens)

    def forward_flops(self, seq_len: int, tokens: float) -> float:
        """Forward-only FLOPs (a teacher producing logits) on `tokens` tokens."""
        return forward_flops(self.non_embedding_params, self.n_layers, self.d_model, seq_len, tokens)


def training_flops(n_non_embed: int, n_layers: int, d_model: int, seq_len: int, tokens: float) -> float:
    """Training FLOPs: `6·N·tokens + 6·n_layers·seq_len·d_model·tokens` (Kaplan's fwd+bwd count)."""
    return 6.0 * n_non_embed * tokens + 6.0 * n_layers * seq_len * d_model * tokens


def forward_flops(n_non_embed: int, n_layers: int, d_model: int, seq_len: int, tokens: float) -> float:
    """Forward FLOPs, a third of training: `2·N·tokens + 2·n_layers·seq_len·d_model·tokens`."""
    return 2.0 * n_non_embed * tokens + 2.0 * n_layers * seq_len * d_model * tokens


def _meta_model(config: Any) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):  # shapes only: no memory, no init time, whatever the size
        return AutoModelForCausalLM.from_config(config)


def non_embedding_params(model_or_config: Any) -> int:
    """N: parameters of a causal LM (module or transformers config) less its embedding matrices.

    The LM head counts as an embedding matrix (Kaplan's "de-embedding") whether tied or not, so a
    preset's N does not depend on the vocabulary or on tying.
    """
    model = model_or_config if isinstance(model_or_config, torch.nn.Module) else _meta_model(model_or_config)
    total = sum(p.numel() for p in model.parameters())  # tied weights appear once in parameters()
    embed = model.get_input_embeddings().weight
    head = model.get_output_embeddings()
    total -= embed.numel()
    if head is not None and head.weight is not embed:
        total -= head.weight.numel()
    return int(total)


def model_cost_shape(model_or_config: Any) -> CostShape:
    """The CostShape of a transformers causal LM (module or config); attention width = heads × head_dim."""
    config = model_or_config.config if isinstance(model_or_config, torch.nn.Module) else model_or_config
    heads = int(config.num_attention_heads)
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
    return CostShape(non_embedding_params(model_or_config), int(config.num_hidden_layers), heads * head_dim)


def preset_cost_shape(preset: str, vocab: int) -> CostShape:
    """The CostShape of a `pd_lightning.models` preset at a vocabulary size (built on the meta device)."""
    from pd_lightning.models import build_config

    return model_cost_shape(build_config(preset, vocab))


def steps_for_budget(kind: str, value: float, *, student_flops_per_step: float, teacher_flops_per_step: float,
                     tokens_per_step: int, seconds_per_step: float | None = None) -> int:
    """Optimizer steps that fit in a budget: the largest s with s × (cost of one step) <= value.

    kind: `tokens` (training tokens), `flops` (student training + teacher FLOPs charged to the run,
    so a PD run stops after fewer steps than an LM run at equal total compute) or `wall` (seconds,
    given a measured `seconds_per_step`). ConfigError when not even one step fits.
    """
    if kind == "tokens":
        per_step, unit = float(tokens_per_step), "tokens"
    elif kind == "flops":
        per_step, unit = float(student_flops_per_step) + float(teacher_flops_per_step), "FLOPs"
    elif kind == "wall":
        if not seconds_per_step or seconds_per_step <= 0:
            raise ConfigError("trainer.budget_kind='wall' needs a measured seconds_per_step to plan steps "
                              "(train() stops wall budgets on the clock instead)")
        per_step, unit = float(seconds_per_step), "seconds"
    else:
        raise choice_error("trainer.budget_kind", kind, BUDGET_KINDS[1:])
    if not (math.isfinite(value) and value > 0):
        raise ConfigError(f"trainer.budget={value!r} is out of range; allowed: a number > 0 ({unit})")
    # The relative epsilon keeps an exact multiple of the step cost from losing its last step to rounding.
    steps = math.floor(value / per_step * (1 + 1e-12))
    if steps < 1:
        raise ConfigError(f"trainer.budget={value:.6g} {unit} is less than one step ({per_step:.6g} {unit} a step); "
                          "raise trainer.budget or lower trainer.batch_size")
    return steps


# ----------------------------------------------------------------------------- logit stores


def store_cost_meta(shape: CostShape, num_sequences: int, seq_len: int) -> dict[str, Any]:
    """A store manifest's cost meta: the teacher's forward FLOPs over `num_sequences` x `seq_len` tokens."""
    tokens = num_sequences * seq_len  # the teacher runs on every token; the store keeps seq_len - 1 positions
    return {"generation_flops": shape.forward_flops(seq_len, tokens), "generation_tokens": tokens,
            "flops_convention": FLOP_CONVENTION, "teacher_non_embedding_params": shape.non_embedding_params,
            "teacher_layers": shape.n_layers, "teacher_d_model": shape.d_model}


def store_generation_flops(manifest: dict[str, Any]) -> float:
    """Teacher forward FLOPs that produced a logit store, in this module's convention.

    Read from the manifest when it was written under FLOP_CONVENTION; for stores written before,
    recomputed from the teacher dir's config.json when it is still there; else the legacy figure
    (2 × all parameters × positions) or 0.
    """
    meta = manifest.get("meta") or {}
    if meta.get("flops_convention") == FLOP_CONVENTION and "generation_flops" in meta:
        return float(meta["generation_flops"])
    seq_len = int(manifest["positions_per_sequence"]) + 1
    config_file = Path(str(manifest.get("teacher") or "")) / "config.json"
    if config_file.is_file():
        from transformers import AutoConfig

        try:
            shape = model_cost_shape(AutoConfig.from_pretrained(config_file.parent, local_files_only=True))
            return shape.forward_flops(seq_len, int(manifest["num_sequences"]) * seq_len)
        except (OSError, ValueError, KeyError, json.JSONDecodeError):
            pass
    return float(meta.get("generation_flops", 0.0))


__all__ = [
    "BUDGET_KINDS", "FLOP_CONVENTION", "CostShape", "forward_flops", "model_cost_shape", "non_embedding_params",
    "preset_cost_shape", "steps_for_budget", "store_cost_meta", "store_generation_flops", "training_flops",
]
