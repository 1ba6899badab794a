"""Every `pdl` command has --help with examples, and the console script is installed."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from pd_lightning.cli import main

COMMANDS = [
    ["config", "show"], ["data", "prepare"], ["teacher", "train"], ["logits", "generate"], ["logits", "inspect"],
    ["logits", "verify"], ["train"], ["eval"],
]


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_every_command_has_help_with_examples(command, capsys):
    with pytest.raises(SystemExit) as info:
        main([*command, "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert f"usage: pdl {' '.join(command)}" in out and "example" in out


def test_console_script_runs():
    exe = shutil.which("pdl")
    assert exe, "the pdl console script is not on PATH (pip install -e . installs it)"
    proc = subprocess.run([exe, "models"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "1.9B" in proc.stdout and "1,866,565,632" in proc.stdout
