"""Compute and storage cost of a run: FLOPs of student and teacher, and steps for a fixed budget.

FLOP convention (Kaplan et al. 2020, "Scaling Laws for Neural Language Models", Table 1, with its
de-embedding row kept). Per token a decoder is run on, the forward pass costs exactly

    C_forward = 2·N  +  2·d_model·n_vocab  +  2·n_layer·n_ctx·d_attn

and training (forward + backward, the backward counted as twice the forward) `C_train = 3·C_forward`
= `6·N + 6·d_model·n_vocab + 6·n_layer·n_ctx·d_attn`, term by term:

* `2·N`: every non-embedding weight, two FLOPs (a multiply-add) per weight per token. `N` is
  Kaplan's non-embedding parameter count: all parameters except the token-embedding matrix and the
  LM head (the q/k/v/o projections, the SwiGLU gate/up/down and the RMSNorm gains — the gains are
  elementwise, so they add 2 FLOPs per gain where the hardware does one multiply: 0.15% of tiny-1m's
  N, less at larger sizes). `N` does not depend on the vocabulary or on tying.
* `2·d_model·n_vocab`: the LM head's `[d_model] x [d_model, n_vocab]` matmul, Kaplan's
  "de-embed" row. It is computed on every token whether or not the head is tied to the embedding,
  so it is counted for tied models too (the weights are shared, the matmul is not). The embedding
  *lookup* is a gather, not a matmul: not counted.
* `2·n_layer·n_ctx·d_attn`: Kaplan's attention term, `n_ctx` = the sequence length, `d_attn` =
  heads × head_dim. It equals the QKᵀ scores alone over the full context (2·n_ctx·d_attn a layer),
  or the scores plus their application to V (4·n_ctx·d_attn at full context) over a causal context
  of n_ctx/2 keys per query on average (exactly (n_ctx+1)/2, so the term is n_ctx/(n_ctx+1) of that
  causal count: 0.8% under it at 128 tokens). A dense count of scores and values, what eager
  attention's matmuls do without skipping the masked half, is twice the term.

Not counted: the embedding lookup, softmax, the norms' reductions, activations, the optimizer and
the loss (KD or LM) beyond the head's matmul. Tokens are the tokens the model is run on (`n_ctx`
per sequence), for the teacher as for the student. The head's share of the total is large at a big
vocabulary and small width: at n_vocab = 151,552 and n_ctx = 4,096 it is 40% of the 330M's
training FLOPs, 18% of the 1.9B's and 9% of the 6.8B's (leaving it out, as Kaplan's `C ≈ 6N` does,
would undercount them by 68%, 21% and 10%); for tiny-1m at 2,048 tokens and n_ctx = 128, 23.5%.
Teacher and student differ in that share, so a FLOP budget or a "Δ per extra compute" that left it
out would be biased between them.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pd_lightning.config import BUDGET_KINDS, BUDGET_UNITS, budget_range  # declared with trainer.budget_kind
from pd_lightning.errors import ConfigError, choice_error

FLOP_CONVENTION = ("kaplan2020+head: forward 2N+2·d_model·V+2·L·T·d_attn per token, train 3x forward; "
                   "N non-embedding")
# The convention of stores written before the LM head was counted (its forward lacked 2·d_model·V).
_KAPLAN_NO_HEAD = "kaplan2020: train 6N+6·L·T·d, forward 2N+2·L·T·d per token; N non-embedding"


@dataclass(frozen=True)
class CostShape:
    """What the FLOP formulas need to know about a decoder.

    `non_embedding_params` (N), `n_layers`, `d_attn` (heads × head_dim, the attention term's width),
    `d_model` (the hidden size, the LM head's input) and `vocab_size` (the LM head's output).
    """

    non_embedding_params: int
    n_layers: int
    d_attn: int
    d_model: int
    vocab_size: int

    def forward_terms(self, seq_len: int) -> dict[str, float]:
        """Forward FLOPs per token, by term: `non_embedding` 2·N, `head` 2·d_model·V, `attention` 2·L·T·d_attn."""
        return forward_terms(self.non_embedding_params, self.n_layers, self.d_attn, seq_len,
                             d_model=self.d_model, vocab_size=self.vocab_size)

    def training_flops(self, seq_len: int, tokens: float) -> float:
        """Forward + backward FLOPs of training on `tokens` tokens in sequences of `seq_len`."""
        return training_flops(self.non_embedding_params, self.n_layers, self.d_attn, seq_len, tokens,
                              d_model=self.d_model, vocab_size=self.vocab_size)

    def forward_flops(self, seq_len: int, tokens: float) -> float:
        """Forward-only FLOPs (a teacher producing logits) on `tokens` tokens."""
        return forward_flops(self.non_embedding_params, self.n_layers, self.d_attn, seq_len, tokens,
                             d_model=self.d_model, vocab_size=self.vocab_size)


def forward_terms(n_non_embed: int, n_layers: int, d_attn: int, seq_len: int, *, d_model: int,
                  vocab_size: int) -> dict[str, float]:
    """Forward FLOPs per token by term (the module docstring): 2·N, 2·d_model·V (LM head), 2·L·T·d_attn."""
    return {"non_embedding": 2.0 * n_non_embed, "head": 2.0 * d_model * vocab_size,
            "attention": 2.0 * n_layers * seq_len * d_attn}


def forward_flops(n_non_embed: int, n_layers: int, d_attn: int, seq_len: int, tokens: float, *, d_model: int,
                  vocab_size: int) -> float:
    """Forward FLOPs: `(2·N + 2·d_model·V + 2·n_layers·seq_len·d_attn)·tokens`."""
    t = forward_terms(n_non_embed, n_layers, d_attn, seq_len, d_model=d_model, vocab_size=vocab_size)
    return (t["non_embedding"] + t["head"] + t["attention"]) * tokens


def training_flops(n_non_embed: int, n_layers: int, d_attn: int, seq_len: int, tokens: float, *, d_model: int,
                   vocab_size: int) -> float:
    """Training FLOPs, 3 x forward: `(6·N + 6·d_model·V + 6·n_layers·seq_len·d_attn)·tokens`."""
    return 3.0 * forward_flops(n_non_embed, n_layers, d_attn, seq_len, tokens, d_model=d_model, vocab_size=vocab_size)


def _meta_model(config: Any) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):  # shapes only: no memory, no init time, whatever the size
        return AutoModelForCausalLM.from_config(config)


def non_embedding_params(model_or_config: Any) -> int:
    """N: parameters of a causal LM (module or transformers config) less its embedding matrices.

    The LM head counts as an embedding matrix (Kaplan's "de-embedding") whether tied or not, so a
    preset's N does not depend on the vocabulary or on tying; the head's matmul is counted by its own
    term, 2·d_model·vocab per forward token (CostShape.forward_terms).
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
    """The CostShape of a transformers causal LM (module or config).

    d_attn = heads × head_dim; d_model and vocab_size are the LM head's weight shape `[vocab, d_model]`
    (tied or not), read from the module, or from a meta-device build of the config.
    """
    model = model_or_config if isinstance(model_or_config, torch.nn.Module) else _meta_model(model_or_config)
    config = model.config
    heads = int(config.num_attention_heads)
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
    head = model.get_output_embeddings()
    vocab, d_model = head.weight.shape if head is not None else (int(config.vocab_size), int(config.hidden_size))
    return CostShape(non_embedding_params(model), int(config.num_hidden_layers), heads * head_dim, int(d_model),
                     int(vocab))


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
        per_step = float(tokens_per_step)
    elif kind == "flops":
        per_step = float(student_flops_per_step) + float(teacher_flops_per_step)
    elif kind == "wall":
        if not seconds_per_step or seconds_per_step <= 0:
            raise ConfigError("trainer.budget_kind='wall' needs a measured seconds_per_step to plan steps "
                              "(train() stops wall budgets on the clock instead)")
        per_step = float(seconds_per_step)
    else:
        raise choice_error("trainer.budget_kind", kind, BUDGET_KINDS[1:])
    budget_range(kind)("trainer.budget", value)
    unit = BUDGET_UNITS[kind]
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
            "teacher_layers": shape.n_layers, "teacher_d_attn": shape.d_attn, "teacher_d_model": shape.d_model,
            "teacher_vocab_size": shape.vocab_size}


def store_generation_flops(manifest: dict[str, Any]) -> float:
    """Teacher forward FLOPs that produced a logit store, in this module's convention.

    Read from the manifest when it was written under FLOP_CONVENTION; for stores written before,
    recomputed from the teacher dir's config.json when it is still there; else, for a store written
    under the convention without the LM head, its figure plus the head's 2·d·V per generated token
    (d = the recorded attention width, the hidden size of every preset and of Llama/GLM-style
    teachers; V = the store's vocabulary); else the legacy figure (2 × all parameters × positions) or 0.
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
    if (meta.get("flops_convention") == _KAPLAN_NO_HEAD and "generation_flops" in meta
            and "teacher_d_model" in meta and "generation_tokens" in meta and "vocab_size" in manifest):
        head = 2.0 * int(meta["teacher_d_model"]) * int(manifest["vocab_size"]) * int(meta["generation_tokens"])
        return float(meta["generation_flops"]) + head
    return float(meta.get("generation_flops", 0.0))


__all__ = [
    "BUDGET_KINDS", "FLOP_CONVENTION", "CostShape", "forward_flops", "forward_terms", "model_cost_shape",
    "non_embedding_params", "preset_cost_shape", "steps_for_budget", "store_cost_meta", "store_generation_flops",
    "training_flops",
]
