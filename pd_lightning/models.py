"""Student presets (the paper's Table 7 plus tiny CPU sizes) and teacher loading, all via transformers.

Architecture: Llama (`LlamaForCausalLM`). The paper's students are GLM-style decoders — pre-norm,
RMSNorm, rotary positions, SwiGLU FFN, grouped-query attention, no biases except GLM-4's QKV bias.
Llama in transformers has exactly that shape (GQA via `num_key_value_heads`, optional tied
embeddings), and unlike `GlmForCausalLM` it is read by every downstream tool our users evaluate or
serve with (lm-eval's `hf` model, vLLM, llama.cpp converters), and FSDP auto-wrap has a well-known
layer class (`LlamaDecoderLayer`). The QKV bias is a <0.1% parameter difference and is left out.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors import SafetensorError
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, PreTrainedModel

from pd_lightning.config import GLM4_VOCAB_SIZE, PAPER_PRESETS, PRESETS, TEACHER_DTYPES, Preset  # noqa: F401  (declared once, torch-free)
from pd_lightning.errors import DataError, choice_error


def get_preset(name: str) -> Preset:
    """Look up a preset by name, with a "did you mean" for typos."""
    if name not in PRESETS:
        raise choice_error("model.preset", name, PRESETS)
    return PRESETS[name]


def build_config(
    preset: str | Preset,
    vocab_size: int,
    *,
    bos_token_id: int | None = None,
    eos_token_id: int | None = None,
    pad_token_id: int | None = None,
    max_seq_len: int | None = None,
) -> LlamaConfig:
    """The transformers config of a preset for a given vocabulary."""
    p = get_preset(preset) if isinstance(preset, str) else preset
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=p.hidden,
        intermediate_size=p.ffn,
        num_hidden_layers=p.layers,
        num_attention_heads=p.heads,
        num_key_value_heads=p.query_groups,
        head_dim=p.head_dim,
        hidden_act="silu",
        max_position_embeddings=max_seq_len or p.max_seq_len,
        rms_norm_eps=1e-5,
        tie_word_embeddings=p.tied_embeddings,
        attention_bias=False,
        mlp_bias=False,
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
        use_cache=False,
    )


def build_model(preset: str | Preset, vocab_size: int, *, seed: int = 0, **config_kwargs) -> LlamaForCausalLM:
    """A randomly initialised student/teacher of the preset's shape (deterministic for a seed)."""
    config = build_config(preset, vocab_size, **config_kwargs)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return model


def count_parameters(preset: str | Preset, vocab_size: int | None = None, *, non_embedding: bool = False) -> int:
    """Parameter count of a preset, built on the meta device (no memory)."""
    p = get_preset(preset) if isinstance(preset, str) else preset
    with torch.device("meta"):
        model = LlamaForCausalLM(build_config(p, vocab_size or p.reference_vocab))
    total = sum(t.numel() for t in model.parameters())  # tied weights appear once in parameters()
    if non_embedding:
        total -= model.get_input_embeddings().weight.numel()
        if not p.tied_embeddings:
            total -= model.get_output_embeddings().weight.numel()
    return total


def preset_table() -> list[dict]:
    """Every preset with its parameter count at its reference vocabulary (for `pdl models`)."""
    rows = []
    for p in PRESETS.values():
        row = asdict(p)
        row["params"] = count_parameters(p)
        rows.append(row)
    return rows


def teacher_dtype(path: str | Path, setting: str = "auto", device: torch.device | str = "cpu") -> torch.dtype:
    """The dtype a teacher runs in: `teacher.dtype`, or auto = the dir's own dtype on CUDA, float32 elsewhere.

    The dir's dtype is config.json's `dtype` (transformers >= 5) or `torch_dtype`; a dir that names
    none (or names another type) runs in float32, as transformers loads it. float32 on CPU because
    CPU bf16 matmuls are slow and the byte-identical CPU stores are made in float32.
    """
    if setting not in TEACHER_DTYPES:
        raise choice_error("teacher.dtype", setting, TEACHER_DTYPES)
    if setting != "auto":
        return getattr(torch, setting)
    if torch.device(device).type != "cuda":
        return torch.float32
    try:
        config = json.loads((Path(path) / "config.json").read_text())
    except (OSError, ValueError):
        return torch.float32
    named = config.get("dtype") or config.get("torch_dtype") if isinstance(config, dict) else None
    return getattr(torch, named) if named in TEACHER_DTYPES[1:] else torch.float32


def load_causal_lm(path: str | Path, *, dtype: torch.dtype | None = None, what: str = "teacher.path") -> PreTrainedModel:
    """Load a local HF causal-LM dir with one-line errors for a missing or unusable dir (no hub access)."""
    path = Path(path)
    if not path.is_dir():
        raise DataError(f"{what}={str(path)!r} is not a directory; expected a local Hugging Face model dir")
    if not (path / "config.json").is_file():
        raise DataError(f"{what}={str(path)!r} has no config.json; expected a Hugging Face model dir (save_pretrained output)")
    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True)
    except (ValueError, OSError, json.JSONDecodeError, KeyError) as exc:
        raise DataError(f"{what}={str(path)!r} has an unreadable config.json: {str(exc).splitlines()[0]}") from None
    try:
        model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=dtype or torch.float32)
    except ValueError as exc:
        raise DataError(
            f"{what}={str(path)!r} holds a {config.model_type!r} model, which is not a causal LM "
            f"({str(exc).splitlines()[0][:120]})"
        ) from None
    except (OSError, SafetensorError) as exc:  # missing, or truncated / corrupt weight files
        raise DataError(f"{what}={str(path)!r} has no loadable weights: {str(exc).splitlines()[0][:160]}") from None
    model.eval()
    return model
