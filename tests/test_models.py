"""Model presets (Table 7 sizes on the meta device), deterministic init, teacher loading errors."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaForCausalLM, ViTConfig, ViTModel

from pd_lightning.errors import ConfigError, DataError
from pd_lightning.models import PAPER_PRESETS, PRESETS, build_model, count_parameters, get_preset, load_causal_lm


@pytest.mark.parametrize("name", PAPER_PRESETS)
def test_table7_presets_match_their_names_within_5_percent(name):
    preset = PRESETS[name]
    n = count_parameters(preset)  # meta device: no memory, so 6.8B is fine here
    assert abs(n / preset.nominal_params - 1) <= 0.05, (name, n)


def test_table7_shapes_are_the_papers():
    expected = {  # hidden, FFN, layers, heads, query groups, tied
        "330M": (1024, 4096, 12, 16, 2, True), "670M": (1024, 4096, 24, 16, 2, False),
        "1.9B": (2048, 6912, 24, 16, 2, False), "3.8B": (3072, 8192, 28, 24, 8, False),
        "6.8B": (4096, 12800, 28, 32, 8, False),
    }
    for name, shape in expected.items():
        p = PRESETS[name]
        assert (p.hidden, p.ffn, p.layers, p.heads, p.query_groups, p.tied_embeddings) == shape


@pytest.mark.parametrize("name", ["tiny-1m", "tiny-2m", "tiny-5m", "tiny-20m"])
def test_tiny_presets_are_about_their_size(name):
    preset = PRESETS[name]
    assert abs(count_parameters(preset) / preset.nominal_params - 1) <= 0.06


def test_build_model_is_deterministic_per_seed_and_gqa():
    a, b, c = (build_model("tiny-1m", 300, seed=s) for s in (1, 1, 2))
    assert isinstance(a, LlamaForCausalLM)
    assert a.config.num_key_value_heads == 2 and a.config.num_attention_heads == 4
    for (n, pa), pb, pc in zip(a.named_parameters(), b.parameters(), c.parameters()):
        assert torch.equal(pa, pb), n
    assert any(not torch.equal(pa, pc) for pa, pc in zip(a.parameters(), c.parameters()))
    out = a(input_ids=torch.randint(0, 300, (2, 16))).logits
    assert out.shape == (2, 16, 300)


def test_unknown_preset_suggests():
    with pytest.raises(ConfigError, match="did you mean 'tiny-5m'"):
        get_preset("tiny-5M")


def test_load_causal_lm_errors(tmp_path):
    with pytest.raises(DataError, match="is not a directory"):
        load_causal_lm(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no config.json"):
        load_causal_lm(tmp_path / "empty")
    vit = ViTModel(ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                             image_size=8, patch_size=4))
    vit.save_pretrained(tmp_path / "vit")
    with pytest.raises(DataError, match="'vit' model, which is not a causal LM"):
        load_causal_lm(tmp_path / "vit")
    model = build_model("tiny-1m", 300)
    model.save_pretrained(tmp_path / "noweights")
    (tmp_path / "noweights" / "model.safetensors").unlink()
    with pytest.raises(DataError, match="no loadable weights"):
        load_causal_lm(tmp_path / "noweights")
