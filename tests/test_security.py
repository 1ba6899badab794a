"""Security defaults: no unpickling of anything we read (checkpoints with weights_only=True, no pickle in
stores or shards, numpy without pickles), safe YAML only, no remote code from model dirs, and every
server or UI command we document binds to 127.0.0.1.

The source checks walk the syntax trees of the library, analysis, benchmarks and notebooks, so a new
call site is checked the day it is written; each check also asserts it saw the call sites that exist
today, so a scanner that silently finds nothing fails too.
"""

from __future__ import annotations

import ast
import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from pd_lightning.config import load_config
from pd_lightning.errors import ConfigError, DataError
from pd_lightning.logits.store import MAGIC

from conftest import TINY_DATA

ROOT = Path(__file__).resolve().parents[1]
SOURCE_DIRS = ("pd_lightning", "analysis", "benchmarks", "notebooks")
PICKLE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "shelve", "marshal"}


def _sources() -> dict[str, ast.AST]:
    """Syntax trees of every Python file and notebook code cell under SOURCE_DIRS."""
    trees = {}
    for d in SOURCE_DIRS:
        for path in sorted((ROOT / d).rglob("*")):
            rel = str(path.relative_to(ROOT))
            if path.suffix == ".py":
                trees[rel] = ast.parse(path.read_text(encoding="utf-8"), rel)
            elif path.suffix == ".ipynb" and ".ipynb_checkpoints" not in rel:
                cells = json.loads(path.read_text(encoding="utf-8")).get("cells", [])
                for i, cell in enumerate(cells):
                    if cell.get("cell_type") == "code":
                        src = "".join(cell.get("source", []))
                        src = "\n".join("" if line.lstrip().startswith(("%", "!")) else line for line in src.splitlines())
                        trees[f"{rel}[cell {i}]"] = ast.parse(src, rel)
    return trees


SOURCES = _sources()


def _calls(predicate):
    """(where, call) for every call in the sources that `predicate(call)` selects."""
    found = []
    for rel, tree in SOURCES.items():
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and predicate(node):
                found.append((f"{rel}:{node.lineno}", node))
    return found


def _dotted(node: ast.AST) -> str:
    """'torch.load' for torch.load(...), 'self.trainer.fit' for self.trainer.fit(...), '' otherwise."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
        return ".".join(reversed(parts))
    return ""


def _kw(call: ast.Call, name: str):
    """The keyword's constant value, `...` when it is absent, `None`-able, or a non-constant marker."""
    for kw in call.keywords:
        if kw.arg == name:
            return kw.value.value if isinstance(kw.value, ast.Constant) else "<expression>"
    return ...


def test_the_scan_covers_the_code():
    assert any(rel.startswith("pd_lightning/train.py") for rel in SOURCES)
    assert len([r for r in SOURCES if r.startswith("pd_lightning/")]) >= 20


def test_every_checkpoint_load_uses_weights_only():
    loads = _calls(lambda c: _dotted(c.func) in ("torch.load", "torch.serialization.load"))
    bad = [w for w, c in loads if _kw(c, "weights_only") is not True]
    assert not bad, f"torch.load without weights_only=True at {bad}"
    # Lightning loads the checkpoint of a resumed fit: our fit/validate/test calls with ckpt_path pass weights_only.
    fits = _calls(lambda c: _dotted(c.func).rsplit(".", 1)[-1] in ("fit", "validate", "test", "predict")
                  and _kw(c, "ckpt_path") is not ...)
    assert fits, "expected the resume path (trainer.fit(..., ckpt_path=...)) in pd_lightning/train.py"
    bad = [w for w, c in fits if _kw(c, "weights_only") is not True]
    assert not bad, f"Trainer call with ckpt_path but without weights_only=True at {bad}"
    bad = [w for w, c in _calls(lambda c: _dotted(c.func).endswith("load_from_checkpoint"))
           if _kw(c, "weights_only") is not True]
    assert not bad, f"load_from_checkpoint without weights_only=True at {bad}"


def test_no_pickle_anywhere_and_numpy_never_allows_it():
    imports = []
    for rel, tree in SOURCES.items():
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            imports += [f"{rel}:{node.lineno} {n}" for n in names if n.split(".")[0] in PICKLE_MODULES]
    assert not imports, f"pickle-family imports: {imports}"
    np_loads = _calls(lambda c: _dotted(c.func) in ("np.load", "numpy.load"))
    assert np_loads, "expected np.load of the online store's sequence map"
    bad = [w for w, c in np_loads if _kw(c, "allow_pickle") is not False]
    assert not bad, f"np.load without allow_pickle=False at {bad}"
    bad = [w for w, c in _calls(lambda c: _dotted(c.func) in ("np.save", "numpy.save")) if _kw(c, "allow_pickle") is not False]
    assert not bad, f"np.save without allow_pickle=False at {bad}"
    bad = [w for w, c in _calls(lambda c: _dotted(c.func).endswith(("read_pickle", "to_pickle")))]
    assert not bad, f"pandas pickle I/O at {bad}"


def test_yaml_is_only_ever_safe_loaded():
    yaml_calls = _calls(lambda c: _dotted(c.func).startswith("yaml."))
    assert any(_dotted(c.func) == "yaml.safe_load" for _, c in yaml_calls)
    allowed = {"yaml.safe_load", "yaml.safe_dump", "yaml.safe_load_all", "yaml.safe_dump_all", "yaml.dump"}
    bad = [f"{w} {_dotted(c.func)}" for w, c in yaml_calls if _dotted(c.func) not in allowed]
    assert not bad, f"unsafe YAML calls: {bad}"
    loaders = [w for w, c in _calls(lambda c: _kw(c, "Loader") is not ...)]
    assert not loaders, f"explicit YAML Loader= at {loaders}"


def test_no_remote_code_from_model_dirs():
    bad = [w for w, c in _calls(lambda c: _kw(c, "trust_remote_code") not in (..., False))]
    assert not bad, f"trust_remote_code enabled at {bad}"


def test_python_tags_in_config_yaml_are_refused_without_running_them(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    marker = tmp_path / "ran"
    for payload in (f"!!python/object/apply:os.system ['touch {marker}']",
                    f"!!python/object/new:subprocess.Popen [['touch', '{marker}']]",
                    "!!python/name:os.system"):
        (tmp_path / "evil.yaml").write_text(f"loss:\n  kind: {payload}\n")
        with pytest.raises(ConfigError, match="not valid YAML"):
            load_config(tmp_path / "evil.yaml")
        with pytest.raises(ConfigError):
            load_config("tiny", [f"loss.kind={payload}"])  # overrides are YAML too: a tag stays a plain string
    assert not marker.exists()


def test_store_and_shard_files_hold_no_pickle(tiny_store: Path, tiny_data: Path):
    files = [p for p in (*tiny_store.rglob("*"), *tiny_data.rglob("*")) if p.is_file()]
    assert {p.suffix for p in files} >= {".bin", ".json"}
    for path in files:
        head = path.read_bytes()[:8]
        assert not head.startswith(b"\x80"), f"{path} starts like a pickle (protocol >= 2)"
        assert not head.startswith(b"PK\x03\x04"), f"{path} is a zip (torch.save format)"
        if path.suffix == ".json":
            json.loads(path.read_text())  # plain JSON, nothing else
        elif path.suffix == ".npy":
            np.load(path, allow_pickle=False)
        elif path.parent == tiny_store and path.suffix == ".bin":
            assert head == MAGIC, path
    for path in tiny_data.glob("*.bin"):  # raw little-endian token ids: exactly sequences x seq_len x 2 bytes
        assert path.stat().st_size % (2 * 64) == 0, path


class _Payload:
    """Unpickling this calls open(path, "w"): a visible side effect of code run by a checkpoint."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_a_checkpoint_with_a_pickled_object_is_refused_on_resume(tiny_data, tiny_store, tmp_path):
    from pd_lightning.train import check_checkpoint, train

    probe = tmp_path / "probe.ckpt"
    torch.save({"state_dict": {}, "x": _Payload(tmp_path / "ran-without-weights-only")}, probe)
    torch.load(probe, weights_only=False)  # the payload is real: a plain torch.load runs it
    assert (tmp_path / "ran-without-weights-only").exists()

    out, uri = tmp_path / "run", f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = [*TINY_DATA, f"data.out={tiny_data}", f"logits.store={tiny_store}", f"trainer.out={out}",
            f"tracking.tracking_uri={uri}", "loss.alpha=0", "trainer.batch_size=8", "trainer.max_steps=4",
            "trainer.checkpoint_every_n_steps=2", "trainer.val_every_n_steps=2", "trainer.val_batches=1",
            "trainer.num_workers=0"]
    train(load_config("tiny", args))
    (ckpt,) = (out / "checkpoints").glob("*.ckpt")
    check_checkpoint(ckpt)  # what our own training writes passes the pre-resume check
    state = torch.load(ckpt, weights_only=True)
    state["evil"] = _Payload(tmp_path / "ran-on-resume")
    torch.save(state, ckpt)
    for f in (out / "model").iterdir():  # an unfinished run again: the next train() resumes from ckpt
        f.unlink()
    (out / "model").rmdir()
    with pytest.raises(DataError, match=r"checkpoint .* cannot be loaded safely: it holds a pickled object \((builtins|io)\.open\)"):
        train(load_config("tiny", args))
    assert not (tmp_path / "ran-on-resume").exists(), "resuming ran code from the checkpoint"
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [ckpt.name]  # no exception checkpoint to resume from
    torn = out / "checkpoints" / "torn.ckpt"
    torn.write_bytes(ckpt.read_bytes()[:1000])
    with pytest.raises(DataError, match="torn.ckpt' cannot be loaded safely"):
        check_checkpoint(torn)


# ---------------------------------------------------------------------------------------- servers

# A command (the name followed by an argument or the line's end), not a mention such as "(`optuna-dashboard`, ...".
SERVER = re.compile(r"(?<!pip install )\b(mlflow (?:ui|server)|optuna-dashboard|tensorboard|jupyter[- ](?:lab|notebook))"
                    r"(?=\s+[^\s`),;]|\s*$)")
HOST_FLAG = re.compile(r"(?:--host|-h|--ip|--hostname)[ =](\S+)|--bind[_-]all")
LOOPBACK_HOSTS = {"127.0.0.1", "localhost", "::1", "[::1]"}
# Without a host flag these bind to loopback by default: mlflow's is read from its CLI in the test; the
# others are their documented defaults (optuna-dashboard --host 127.0.0.1, tensorboard localhost unless
# --bind_all, jupyter ServerApp.ip 'localhost').
DEFAULT_LOOPBACK = {"optuna-dashboard", "tensorboard", "jupyter lab", "jupyter notebook", "jupyter-lab", "jupyter-notebook"}


def _server_commands() -> list[tuple[str, str]]:
    """(where, line) of every server/UI command in README.md and in what the package prints or shows in --help."""
    found = []
    texts = [ROOT / "README.md", *sorted((ROOT / "pd_lightning").rglob("*.py")), *sorted((ROOT / "sweeps").rglob("*.yaml")),
             ROOT / "mlflow.yaml"]
    for path in texts:
        if not path.is_file():
            continue
        for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if SERVER.search(line):
                found.append((f"{path.relative_to(ROOT)}:{i}", line.strip()))
    return found


def _binds_loopback(line: str, tool: str) -> bool:
    hosts = [m.group(1) or "0.0.0.0" for m in HOST_FLAG.finditer(line)]  # --bind_all: every interface
    if hosts:
        return all(h.strip("'\"`") in LOOPBACK_HOSTS for h in hosts)
    if tool.startswith("mlflow"):
        from mlflow.cli import cli

        host = next(p.default for p in cli.get_command(None, "server").params if p.name == "host")
        return host in LOOPBACK_HOSTS  # `mlflow ui` is `mlflow server`
    return tool in DEFAULT_LOOPBACK


def test_every_documented_server_or_ui_binds_to_loopback():
    commands = _server_commands()
    readme_ui = [line for w, line in commands if w.startswith("README.md") and "mlflow ui" in line]
    assert readme_ui, "README.md should show how to browse runs (mlflow ui ... --host 127.0.0.1)"
    assert all(re.search(r"--host[ =]127\.0\.0\.1\b", line) for line in readme_ui), readme_ui
    bad = [f"{w}: {line}" for w, line in commands if not _binds_loopback(line, SERVER.search(line).group(1))]
    assert not bad, "server commands that bind beyond 127.0.0.1:\n" + "\n".join(bad)
    everything = "\n".join(p.read_text(encoding="utf-8") for p in (ROOT / "README.md", *(ROOT / "pd_lightning").rglob("*.py")))
    assert "0.0.0.0" not in everything, "a documented command binds every interface"


def test_loopback_check_is_not_vacuous():
    for line, ok in [("mlflow ui --backend-store-uri sqlite:///mlflow.db --host 127.0.0.1", True),
                     ("mlflow server --backend-store-uri postgresql://x --host 0.0.0.0 --port 5000", False),
                     ("optuna-dashboard sqlite:///optuna.db --host 0.0.0.0", False),
                     ("tensorboard --logdir runs --bind_all", False),
                     ("jupyter lab --ip=192.168.1.5 notebooks/", False),
                     ("jupyter lab notebooks/", True)]:
        match = SERVER.search(line)
        assert match and _binds_loopback(line, match.group(1)) is ok, line
    assert not SERVER.search("pip install optuna-dashboard")
    assert not SERVER.search("the study is a plain Optuna study (`optuna-dashboard`, `optuna trials ...`)")
