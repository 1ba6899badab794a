"""Config composition, overrides and every validation error (one line, field + value + allowed)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from pd_lightning.config import (
    PDLConfig,
    config_hash,
    flatten,
    load_config,
    to_yaml,
)
from pd_lightning.errors import ConfigError


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_defaults_are_valid_and_packaged_tiny_loads():
    cfg = load_config()
    assert isinstance(cfg, PDLConfig) and cfg.loss.kind == "nll"
    tiny = load_config("tiny")
    assert tiny.model.preset == "tiny-1m" and tiny.data.out == "runs/tiny/data"


def test_composition_order_defaults_then_file_then_overrides(tmp_path):
    write(tmp_path / "base.yaml", "loss:\n  alpha: 0.5\n  kind: kld\noptim:\n  lr: 0.01\n")
    write(tmp_path / "mid.yaml", "defaults: [base.yaml]\nloss:\n  alpha: 0.7\n")
    top = write(tmp_path / "top.yaml", "defaults: [tiny, mid.yaml]\noptim:\n  lr: 0.02\n")
    cfg = load_config(top, ["loss.alpha=0.9"])
    assert cfg.loss.alpha == 0.9  # override beats everything
    assert cfg.loss.kind == "kld"  # from base, untouched later
    assert cfg.optim.lr == 0.02  # the file beats its defaults
    assert cfg.model.preset == "tiny-1m"  # from the packaged tiny config
    assert cfg.data.out == "runs/tiny/data"


def test_yaml_roundtrip_and_hash_is_stable(tmp_path):
    cfg = load_config("tiny", ["loss.alpha=0.9", "logits.method=wttm"])
    again = load_config(write(tmp_path / "dump.yaml", to_yaml(cfg)))
    assert again == cfg
    assert config_hash(cfg) == config_hash(again)
    assert config_hash(cfg) != config_hash(load_config("tiny"))
    flat = flatten(cfg)
    assert flat["loss.alpha"] == 0.9 and flat["logits.method"] == "wttm"


def test_override_values_are_typed():
    cfg = load_config(None, ["loss.alpha=0", "data.tokenizer=null", "loss.fused=true", "logits.k=50"])
    assert cfg.loss.alpha == 0.0 and cfg.data.tokenizer is None and cfg.loss.fused is True and cfg.logits.k == 50


BAD_OVERRIDES = [
    ("logits.p=0", "logits.p=0"),
    ("logits.p=1.5", "(0, 1]"),
    ("logits.k=0", "logits.k=0"),
    ("logits.k=2.5", "logits.k"),
    ("logits.tau=0", "logits.tau=0"),
    ("logits.tau=-1", "a number > 0"),
    ("logits.method=normkdd", "did you mean 'normkd'"),
    ("logits.store_p=0", "logits.store_p"),
    ("logits.store_k=-3", "logits.store_k"),
    ("logits.mode=onlin", "logits.mode"),
    ("logits.adakd_min_tau=3", "adakd_min_tau"),
    ("logits.k=200", "<= logits.store_k"),
    ("logits.p=0.99", "<= logits.store_p"),
    ("logits.method=normkd logits.tau=2", "not used by"),
    ("logits.normkd_student_tau=detach", "did you mean 'detached'"),
    ("loss.alpha=1.2", "[0, 1]"),
    ("loss.alpha=-0.1", "loss.alpha"),
    ("loss.alpha=abc", "loss.alpha"),
    ("loss.kind=kldd", "did you mean 'kld'"),
    ("loss.alpha_schedule=wsd-alpha", "did you mean 'wsd_alpha'"),
    ("loss.alpha_warmup_frac=0.95", "loss.alpha_decay_frac"),
    ("loss.wsd_peak=0.5", "loss.wsd_peak=0.5"),  # the constant schedule has no peak
    ("loss.alpha_schedule=wsd_beta loss.wsd_peak=1.5", "loss.wsd_peak=1.5"),
    ("loss.alpha_schedule=wsd_beta loss.alpha=0.9", "loss.alpha=0.9"),  # wsd_beta: α starts and ends at 1
    ("loss.alpha_schedule=wsd_alpha loss.alpha=0.5 loss.wsd_peak=0.7", "loss.alpha=0.5"),
    ("loss.jsd_beta=1", "loss.jsd_beta"),
    ("loss.chunk_size=0", "loss.chunk_size"),
    ("optim.lr=0", "optim.lr"),
    ("optim.lr_schedule=cosin", "did you mean 'cosine'"),
    ("optim.decay_shape=sqrt", "optim.decay_shape"),
    ("optim.warmup_frac=0.9", "optim.decay_frac"),
    ("optim.beta2=1", "optim.beta2"),
    ("trainer.max_steps=0", "trainer.max_steps"),
    ("trainer.batch_size=-1", "trainer.batch_size"),
    ("trainer.precision=bf16", "trainer.precision"),
    ("trainer.strategy=dpp", "did you mean 'ddp'"),
    ("model.preset=1.9b", "did you mean '1.9B'"),
    ("teacher.preset=tiny-3m", "teacher.preset"),
    ("data.source=jsonl", "data.path is required"),
    ("data.source=csv", "data.source"),
    ("data.seq_len=1", "data.seq_len"),
    ("data.vocab_size=100", "data.vocab_size"),
    ("data.train_tokens=0", "data.train_tokens"),
    ("loss.alpa=0.5", "did you mean 'alpha'"),
    ("los.alpha=0.5", "did you mean 'loss'"),
    ("alpha=0.5", "section.key"),
    ("loss.alpha", "section.key=value"),
    ("eval.limit=0", "eval.limit"),
]


@pytest.mark.parametrize("override,needle", BAD_OVERRIDES)
def test_every_validation_error_is_one_line_naming_the_field(override, needle):
    with pytest.raises(ConfigError) as info:
        load_config(None, override.split(" "))
    message = str(info.value)
    assert "\n" not in message
    assert needle in message


@pytest.mark.parametrize(
    "text,needle",
    [
        ("loss:\n  alpha: [0.5\n", "not valid YAML at line"),
        ("- a\n- b\n", "must hold a mapping"),
        ("loss: 3\n", "must be a mapping"),
        ("losses:\n  alpha: 0.5\n", "did you mean 'loss'"),
        ("loss:\n  alpha: zero\n", "loss.alpha"),
        ("defaults: [nowhere.yaml]\n", "neither a file nor a packaged config"),
        ("defaults: 3\n", "must be a list"),
    ],
)
def test_bad_files_give_one_line_errors(tmp_path, text, needle):
    path = write(tmp_path / "bad.yaml", text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert needle in str(info.value) and "\n" not in str(info.value)


def test_defaults_cycle_and_missing_file(tmp_path):
    write(tmp_path / "a.yaml", "defaults: [b.yaml]\n")
    write(tmp_path / "b.yaml", "defaults: [a.yaml]\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(tmp_path / "a.yaml")
    with pytest.raises(ConfigError, match="tiny"):  # lists the packaged configs
        load_config(tmp_path / "missing.yaml")


def test_cli_bad_input_exits_2_with_one_line_and_no_traceback():
    proc = subprocess.run([sys.executable, "-m", "pd_lightning.cli", "config", "show", "tiny", "loss.kind=kl_div"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("pdl: error: loss.kind='kl_div'")
    assert "Traceback" not in proc.stderr and proc.stdout == ""


def test_cli_config_show_prints_resolved_yaml(capsys):
    from pd_lightning.cli import main

    assert main(["config", "show", "tiny", "loss.alpha=0.25"]) == 0
    out = capsys.readouterr().out
    assert "alpha: 0.25" in out and "preset: tiny-1m" in out


# ----------------------------------------------------------------------------- declared once, torch-free


def test_loading_validating_and_dumping_a_config_imports_no_torch():
    # `pdl config show` and whatever only reads configs must not pay torch's (or transformers') import.
    code = ("import sys; from pd_lightning.config import load_config, to_yaml; to_yaml(load_config('tiny')); "
            "print(sorted(m for m in ('torch', 'transformers', 'lightning') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert proc.stdout.strip() == "[]"


# The sweep cache and `pdl train`'s resume key on config_hash: a change of these digests (a renamed field,
# a default, how a field is declared) silently invalidates every finished run and store. Change them only
# on purpose.
PINNED_HASHES = {None: "e8acb7ad5b4dc23e", "tiny": "33fbe001c5ea8b2b", "paper": "a8f931446314c548"}


@pytest.mark.parametrize("name", PINNED_HASHES)
def test_config_hash_of_the_default_and_packaged_configs_is_pinned(name):
    assert config_hash(load_config(name)) == PINNED_HASHES[name]
    if name is None:
        assert config_hash(PDLConfig()) == PINNED_HASHES[None]


def test_library_name_tuples_are_the_config_declarations():
    from pd_lightning import config, cost, losses, schedules
    from pd_lightning.logits import codec, processing

    assert losses.LOSS_KINDS is config.LOSS_KINDS and codec.ENCODINGS is config.STORE_ENCODINGS
    assert processing.METHODS is config.TEMPERATURE_METHODS and cost.BUDGET_KINDS is config.BUDGET_KINDS
    assert schedules.ALPHA_SCHEDULES is config.ALPHA_SCHEDULES and schedules.LR_SCHEDULES is config.LR_SCHEDULES
    assert processing.check_power_exponents is config.check_power_exponents
    assert config.FIELD_CHECKS["loss.kind"][0].allowed == config.LOSS_KINDS


@pytest.mark.parametrize("name,value,needle", [
    ("loss.alpha", 1.5, "loss.alpha=1.5 is out of range; allowed: [0, 1]"),
    ("logits.p", 0.0, "logits.p=0.0 is out of range; allowed: (0, 1]"),
    ("data.seq_len", 1, "allowed: an integer >= 2 (next-token prediction needs two tokens)"),
    ("loss.kind", "kl", "loss.kind='kl' is not allowed; expected one of nll, kld"),
    ("eval.limit", 0, "eval.limit=0 is out of range; allowed: an integer >= 1"),
])
def test_check_field_gives_the_error_validate_gives(name, value, needle):
    from pd_lightning.config import check_field

    with pytest.raises(ConfigError) as direct:
        check_field(name, value)
    assert needle in str(direct.value)
    with pytest.raises(ConfigError) as loaded:
        load_config(None, [f"{name}={value}"])
    assert str(loaded.value) == str(direct.value)


def test_check_field_lets_null_through_only_for_optional_fields():
    from pd_lightning.config import check_field

    assert check_field("eval.limit", None) is None and check_field("loss.wsd_peak", None) is None
    with pytest.raises(ConfigError, match="loss.alpha=None"):
        check_field("loss.alpha", None)


@pytest.mark.parametrize("overrides,needle", [
    # rules across fields that `pdl train` used to find only after reading the data and the store
    ("loss.fused=true logits.mode=cotrain", "loss.fused=true is not available with logits.mode='cotrain'"),
    ("loss.fused=true logits.method=normkd", "loss.fused=true cannot be combined with logits.method='normkd'"),
    ("logits.mode=online_store teacher.max_steps=1 logits.online_end_frac=0.9", "keep no step of teacher.max_steps=1"),
])
def test_rules_across_fields_are_refused_when_the_config_loads(overrides, needle):
    with pytest.raises(ConfigError, match=re.escape(needle)) as info:
        load_config(None, overrides.split(" "))
    assert "\n" not in str(info.value)


def test_rules_across_fields_allow_what_runs():
    # An LM-only run (alpha 0) has no teacher logits, so the fused loss is fine in any mode or method.
    load_config(None, ["loss.fused=true", "logits.mode=cotrain", "loss.alpha=0"])
    load_config(None, ["loss.fused=true", "logits.method=normkd", "loss.alpha=0"])
    load_config(None, ["logits.mode=online_store", "teacher.max_steps=2", "logits.online_start_frac=0.5"])
