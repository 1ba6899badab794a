"""The sweep's study as Optuna's own tools see it (the dashboard reads the same fields): the objective's
metric name, every trial's full design-space coordinates as parameters with the same keys and
distributions in every trial, the replicate seed as a user attribute, `val/loss` as intermediate values;
TPE over such a study; `--tracking-uri`; sweep files by name, shipped in the wheel.

Real components only: a real tiny sweep through `pdl`, real sqlite Optuna and MLflow stores, a real wheel.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import zipfile

import optuna
import pytest
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from pd_lightning.errors import ConfigError
from pd_lightning.sweep import PAPER_KNOBS, design_space, load_sweep, resolve_place, shipped_sweeps

from test_sweep import SWEEPS, pdl, write_sweep

ROOT = SWEEPS.parent
pytestmark = pytest.mark.filterwarnings("ignore:Heartbeat of storage")  # claims outside study.optimize, as workers do
# No lm-eval (the study is the point here, not the scores); 4 steps with a validation every 2, a short held-out pass.
NO_EVAL = {"eval": False, "objective": {"metric": "heldout_loss", "direction": "minimize"}}
QUICK = {"trainer.max_steps": 4, "trainer.val_every_n_steps": 2, "trainer.checkpoint_every_n_steps": 4,
         "eval.heldout_sequences": 16}


def test_a_grid_study_names_its_metric_and_carries_full_coordinates_seeds_and_curves(tmp_path, capsys):
    from pd_lightning.cli import main

    # Two LM-only configurations (no teacher or logit store to build) that set different keys, at seed 1.
    # (Seeds sharing a configuration's parameters: test_tpe_search_and_its_baseline_share_keys_and_distributions.)
    path = write_sweep(tmp_path, "dash", baseline={"label": "cosine", "set": {"loss.alpha": 0.0}},
                       rows=[{"label": "WSD", "set": {"loss.alpha": 0.0, "optim.lr_schedule": "wsd", "optim.lr": 1e-3}}],
                       seeds=[1], set=QUICK, **NO_EVAL)
    store = tmp_path / "elsewhere" / "mlflow.db"  # --tracking-uri: the runs and, by default, the study go there
    uri = f"sqlite:///{store}"
    result = pdl("sweep", "run", str(path), "--cache", str(tmp_path / "cache"), "--tracking-uri", uri, cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "optuna.db").exists()

    study = optuna.load_study(study_name="dash.default", storage=f"sqlite:///{store.parent / 'optuna.db'}")
    trials = study.get_trials(states=(TrialState.COMPLETE,))
    assert len(trials) == 2 == len(study.trials)
    assert study.metric_names == ["heldout_loss"]

    keys = set(trials[0].params)
    assert keys == set(PAPER_KNOBS) | {"optim.lr"}  # the paper's knobs + every key a row sets; no seed
    assert all(set(t.params) == keys for t in trials)
    assert all(t.distributions == trials[0].distributions for t in trials)  # what importance and slices need
    by_label = {(t.user_attrs["pdl.label"], t.user_attrs["seed"]): t for t in trials}
    assert set(by_label) == {("cosine", 1), ("WSD", 1)}
    cosine, wsd = by_label["cosine", 1].params, by_label["WSD", 1].params
    assert (cosine["optim.lr_schedule"], cosine["optim.lr"]) == ("cosine", 3e-3)  # filled from the resolved config
    assert (wsd["optim.lr_schedule"], wsd["optim.lr"]) == ("wsd", 1e-3)
    paper_knobs = (cosine["loss.alpha"], cosine["loss.kind"], cosine["logits.tau"], cosine["model.preset"])
    assert paper_knobs == (0.0, "nll", 1.0, "tiny-1m")

    importance = optuna.importance.get_param_importances(study)  # the dashboard's importance panel
    assert "seed" not in importance and {"optim.lr", "optim.lr_schedule"} <= set(importance)

    client = MlflowClient(tracking_uri=uri)
    for t in trials:  # one intermediate value per validation (every 2 of 4 steps), under MLflow's val/loss steps
        history = {m.step: m.value for m in client.get_metric_history(t.user_attrs["pdl.run_id"], "val/loss")}
        assert len(t.intermediate_values) == 2 and t.intermediate_values == pytest.approx(history)

    assert main(["sweep", "status", str(path), "--tracking-uri", uri]) == 0  # finds the study beside that store
    assert "total: 2 complete" in capsys.readouterr().out  # (`pdl report --tracking-uri`: tests/test_bad_input.py)


def _claim_all(spec, place, value_of) -> optuna.Study:
    """Claim and finish every trial of `spec` in-process, telling `value_of(params)`: the study without training."""
    from pd_lightning.sweep.study import claim, create_study

    space = design_space(spec)
    study = create_study(spec, place, space)
    while (claimed := claim(study, spec, place.storage, space=space)) is not None:
        trial, _ = claimed
        study.tell(trial, value_of(trial.params))
    return study


def test_tpe_search_and_its_baseline_share_keys_and_distributions(tmp_path):
    space = {"loss.alpha": {"low": 0.3, "high": 1.0}, "logits.k": {"low": 5, "high": 100, "log": True, "type": "int"},
             "loss.kind": {"choices": ["nll", "kld"]}}
    spec = load_sweep(write_sweep(tmp_path, "tpe", baseline={"label": "LLM-LM", "set": {"loss.alpha": 0.0}},
                                  search={"sampler": "tpe", "trials": 4, "seed": 3, "space": space}, seeds=[0, 1],
                                  **NO_EVAL))
    place = resolve_place(spec, out=str(tmp_path / "out"), cache=None, storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    study = _claim_all(spec, place, lambda p: (p["loss.alpha"] - 0.8) ** 2 + (p["loss.kind"] == "nll"))
    trials = study.get_trials(states=(TrialState.COMPLETE,))
    search = [t for t in trials if t.user_attrs.get("pdl.search")]
    assert len(search) == 4 and len(trials) == 4 + 2  # the baseline at both seeds
    assert all(t.distributions == trials[0].distributions for t in trials)
    assert all(0.3 <= t.params["loss.alpha"] <= 1.0 and 5 <= t.params["logits.k"] <= 100 for t in search)
    assert len({(t.params["loss.alpha"], t.params["logits.k"]) for t in search}) == 4  # TPE sampled, fixed nothing
    assert all(t.user_attrs["seeds"] == [0, 1] for t in search)
    baseline = [t for t in trials if not t.user_attrs.get("pdl.search")]
    assert {t.user_attrs["seed"] for t in baseline} == {0, 1}
    assert all(t.params["loss.alpha"] == 0.0 for t in baseline)  # recorded where it is, outside the searched range
    assert baseline[0].params == baseline[1].params  # the seeds of one configuration share its coordinates
    # what the search does not vary is its resolved value in every trial
    assert {t.params["optim.lr_schedule"] for t in trials} == {"cosine"} and {t.params["logits.p"] for t in trials} == {0.95}


def test_a_fixed_value_the_search_cannot_store_is_refused_in_one_line(tmp_path, capsys):
    from pd_lightning.cli import main

    path = write_sweep(tmp_path, "unstorable", baseline={"label": "LLM-LM", "set": {"loss.alpha": 0.0}},
                       search={"trials": 2, "space": {"loss.alpha": {"choices": [0.5, 1.0]}}})
    with pytest.raises(ConfigError, match=r"search.space.loss.alpha cannot record loss.alpha=0.0 of configuration "
                                          r"'LLM-LM'.*add 0.0 to them") as err:
        design_space(load_sweep(path))
    assert "\n" not in str(err.value)
    assert main(["sweep", "validate", str(path)]) == 2
    assert "search.space.loss.alpha cannot record" in capsys.readouterr().err


def test_a_changed_category_is_refused_against_the_existing_study(tmp_path):
    """A categorical's choices cannot change within an Optuna study: the file is refused before anything runs."""
    from pd_lightning.sweep.study import claim, create_study

    rows = [{"label": "WSD", "set": {"optim.lr_schedule": "wsd"}}]
    spec = load_sweep(write_sweep(tmp_path, "edit", rows=rows, **NO_EVAL))
    place = resolve_place(spec, out=str(tmp_path / "out"), cache=None, storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    study = create_study(spec, place)
    trial, _ = claim(study, spec, place.storage)
    study.tell(trial, 1.0)
    assert create_study(spec, place).study_name == "edit.default"  # the same file opens its study again
    rows.append({"label": "constant LR", "set": {"optim.lr_schedule": "constant"}})
    edited = load_sweep(write_sweep(tmp_path, "edit", rows=rows, **NO_EVAL))
    with pytest.raises(ConfigError, match=r"optim.lr_schedule: the study 'edit.default' .* records it as"):
        create_study(edited, place)


def test_design_keys_are_the_paper_knobs_and_every_swept_key(tmp_path):
    row = {"label": "wsd peak", "set": {"loss.wsd_peak": 0.5, "loss.alpha_schedule": "wsd_alpha"}}
    spec = load_sweep(write_sweep(tmp_path, "keys", grid={"trainer.max_steps": [10, 20]}, rows=[row]))
    space = design_space(spec)
    assert list(space.distributions) == [*PAPER_KNOBS, "loss.wsd_peak", "trainer.max_steps"]
    dists = space.distributions
    assert type(dists["trainer.max_steps"]).__name__ == "IntDistribution" and (dists["trainer.max_steps"].low,
                                                                               dists["trainer.max_steps"].high) == (10, 20)
    assert type(dists["teacher.path"]).__name__ == "CategoricalDistribution" and dists["teacher.path"].choices == (None,)
    assert all(set(c) == set(dists) for c in space.points.values())


def test_tracking_uri_naming_the_same_store_changes_nothing(tmp_path, monkeypatch):
    from pd_lightning.cli import _with_tracking_uri
    from pd_lightning.config import load_config, same_tracking_store

    monkeypatch.chdir(tmp_path)  # no mlflow.yaml here: the default store is sqlite:///mlflow.db
    assert same_tracking_store("sqlite:///mlflow.db", f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert not same_tracking_store("sqlite:///mlflow.db", "sqlite:///other.db")
    cfg = _with_tracking_uri(load_config("tiny"), f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert cfg.tracking.tracking_uri is None  # the run's identity (digest) stays what it was without the flag
    assert _with_tracking_uri(load_config("tiny"), "http://127.0.0.1:5000").tracking.tracking_uri == "http://127.0.0.1:5000"
    spec = load_sweep("table4_alpha", tracking_uri="sqlite:///mlflow.db")
    assert spec.tracking_uri is None
    moved = load_sweep("table4_alpha", tracking_uri="sqlite:///runs/mlflow.db")
    assert moved.config_for(moved.tasks()[0]).tracking.tracking_uri == "sqlite:///runs/mlflow.db"


@pytest.mark.parametrize("argv", [["train", "--help"], ["sweep", "run", "--help"], ["sweep", "status", "--help"],
                                  ["report", "--help"], ["quickstart", "--help"], ["eval", "--help"]], ids=" ".join)
def test_every_command_that_records_runs_takes_tracking_uri(argv, capsys):
    from pd_lightning.cli import main

    with pytest.raises(SystemExit):
        main(argv)
    assert "--tracking-uri URI" in capsys.readouterr().out


def test_sweeps_by_name_and_a_wrong_name_in_one_line(tmp_path, monkeypatch, capsys):
    from pd_lightning.cli import main

    monkeypatch.chdir(tmp_path)  # no sweeps/ here
    assert set(shipped_sweeps()) == {p.stem for p in SWEEPS.glob("*.yaml")}
    assert load_sweep("table4_alpha").path == SWEEPS / "table4_alpha.yaml" == load_sweep("table4_alpha.yaml").path
    assert main(["sweep", "validate", "table4_alpha", "--scale", "tiny"]) == 0
    assert "ok: table4_alpha [tiny]" in capsys.readouterr().out
    bad = pdl("sweep", "run", "table4_alpah", cwd=tmp_path)  # a real process: exit code 2, one line, nothing written
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    line = bad.stderr.strip().splitlines()[-1]
    assert "'table4_alpah' is neither a file nor a shipped sweep" in line and "table8_top_p_k" in line
    assert "did you mean 'table4_alpha'" in line and list(tmp_path.iterdir()) == []
    assert main(["sweep", "validate", "sweeps/table4_alpha.yaml"]) == 2  # a source-checkout path, elsewhere
    assert "did you mean 'table4_alpha', the shipped sweep?" in capsys.readouterr().err


def test_sweep_names_in_docs_and_help_are_shipped():
    texts = {name: (ROOT / name).read_text() for name in ("README.md", "sweeps/README.md", "pd_lightning/cli.py")}
    named = {(where, m) for where, text in texts.items()
             for m in re.findall(r"pdl (?:sweep (?:run|status|validate)|report) ([a-z][a-z0-9_]*)\b(?![./])", text)}
    assert named, "no sweep is named by its name anywhere"
    assert [(where, m) for where, m in sorted(named) if m not in shipped_sweeps()] == []


def test_the_wheel_ships_every_sweep_file(tmp_path):
    """`pip wheel` of a copy of the source tree (build outputs stay out of the checkout) holds pd_lightning/sweeps/."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "setup.py", "README.md"):
        shutil.copy(ROOT / name, src / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("pd_lightning", "analysis", "sweeps"):
        shutil.copytree(ROOT / name, src / name, ignore=ignore)
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation",
                            "--no-index", "-q", "-w", str(tmp_path / "dist")], capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr[-3000:]
    names = zipfile.ZipFile(next((tmp_path / "dist").glob("pd_lightning-*.whl"))).namelist()
    shipped = sorted(n.split("/")[-1] for n in names if n.startswith("pd_lightning/sweeps/"))
    assert shipped == sorted([p.name for p in SWEEPS.glob("*.yaml")] + ["README.md"])
    assert "pd_lightning/sweep/space.py" in names and "pd_lightning/configs/tiny.yaml" in names
