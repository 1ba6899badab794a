"""The local tasks' items as data files: made by the built-in corpus's generators, shipped beside the task YAMLs.

The YAMLs in `pd_lightning/eval_tasks/tasks` read their items from `tasks/data/<dataset>.<split>.jsonl`
through `tasks/_local_data.py` (which imports nothing of the lab), so plain `lm_eval --include_path`
scores them without pd_lightning installed. The files are the exact items the lab scored when it
generated them in memory: same items, same order, same choices (a test regenerates and compares).

Regenerate after changing a generator in `pd_lightning.data.corpus` or an item count below
(`write_task_data` is the command):

    python -m pd_lightning.evaluation.write_task_data            # rewrite the shipped files (corpus_seed 0)
    python -m pd_lightning.evaluation.write_task_data --check    # exit 1 when the shipped files differ
    python -m pd_lightning.evaluation.write_task_data --corpus-seed 1 --out DIR   # another corpus world

The lab itself scores another world (`data.corpus_seed`, `pdl eval --corpus-seed`) by writing its
files to a temporary dir once per process (`task_data_dir`).
"""

from __future__ import annotations

import atexit
import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from types import ModuleType
from typing import Any


TASKS_DIR = Path(__file__).resolve().parent.parent / "eval_tasks" / "tasks"
HELDOUT_FEWSHOT_ITEMS = 50  # extra items of the same stream, after the test items, for few-shot use
REGENERATE = "python -m pd_lightning.evaluation.write_task_data"
SHIPPED_CORPUS_SEED = 0  # the world whose files ship in tasks/data (the built-in corpus's default)


@lru_cache(maxsize=1)
def local_data() -> ModuleType:
    """`tasks/_local_data.py`, loaded by path as lm-eval loads it (it is no package module): the file
    layout (names, manifest) is declared there once, for the reader lm-eval runs and this writer."""
    path = TASKS_DIR / "_local_data.py"
    spec = importlib.util.spec_from_file_location("pdl_local_task_data", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@dataclass(frozen=True)
class LocalDataset:
    """One dataset of the local tasks: the corpus generator that makes it and its number of test items."""

    name: str  # what a task YAML names as dataset_kwargs.dataset; the stem of its files
    generator: str  # "eval_items" (make_eval_items), "copy_items" (make_copy_items) or "heldout_texts"
    n: int  # test items
    source: str | None = None  # the generator's task (eval_items) or kind (copy_items)

    def splits(self, corpus_seed: int = 0) -> dict[str, list[dict[str, Any]]]:
        """The dataset's splits as item lists, exactly as the corpus generators make them."""
        from pd_lightning.data.corpus import heldout_texts, make_copy_items, make_eval_items

        if self.generator == "eval_items":
            # Item i is a pure function of (task, i, seed), so items past n are disjoint few-shot examples.
            items = make_eval_items(self.source, self.n + HELDOUT_FEWSHOT_ITEMS, seed=corpus_seed)
            return {"test": items[: self.n], "train": items[self.n:]}
        if self.generator == "copy_items":
            return {"test": make_copy_items(self.source, self.n, seed=corpus_seed)}
        return {"test": [{"text": t} for t in heldout_texts(self.n, seed=corpus_seed)]}


# Item counts: 1,200 keep the harness's acc stderr at or below 1.45 points at any accuracy; 600 copying
# items at most 2.0 points; 500 held-out documents for bits per byte.
LOCAL_DATASETS = {d.name: d for d in (
    LocalDataset("synth_continuation", "eval_items", 1200, "synth_continuation"),
    LocalDataset("synth_facts", "eval_items", 1200, "synth_facts"),
    LocalDataset("synth_arithmetic", "eval_items", 1200, "synth_arithmetic"),
    LocalDataset("synth_heldout", "heldout_texts", 500),
    LocalDataset("icl_copy_random", "copy_items", 600, "random"),
    LocalDataset("icl_copy_natural", "copy_items", 600, "natural"),
)}


def jsonl_bytes(items: list[dict[str, Any]]) -> bytes:
    """Items as JSON lines: one object per line, keys in the generator's order, UTF-8, LF endings."""
    return "".join(json.dumps(item, ensure_ascii=False) + "\n" for item in items).encode("utf-8")


def dataset_files(corpus_seed: int = 0) -> dict[str, bytes]:
    """Every file of a local task data dir for a corpus world: {file name: content}, manifest included."""
    layout = local_data()
    files: dict[str, bytes] = {}
    counts: dict[str, dict[str, int]] = {}
    for name, dataset in LOCAL_DATASETS.items():
        splits = dataset.splits(corpus_seed)
        counts[name] = {split: len(items) for split, items in splits.items()}
        files.update({layout.split_file(name, split): jsonl_bytes(items) for split, items in splits.items()})
    manifest = {"corpus_seed": int(corpus_seed), "datasets": counts, "regenerate": REGENERATE,
                "source": "pd_lightning.data.corpus (make_eval_items, make_copy_items, heldout_texts)"}
    files[layout.MANIFEST] = (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode("utf-8")
    return files


def write_files(out: Path, files: dict[str, bytes]) -> None:
    """Write `files` into `out` (each atomically) and remove the .jsonl files no longer made."""
    out.mkdir(parents=True, exist_ok=True)
    for stale in set(p.name for p in out.glob("*.jsonl")) - set(files):
        (out / stale).unlink()
    for name, data in files.items():
        tmp = out / f".{name}.tmp"
        tmp.write_bytes(data)
        os.replace(tmp, out / name)


def differing_files(out: Path, files: dict[str, bytes]) -> list[str]:
    """Names of the files in `out` that differ from `files`, are missing, or are extra .jsonl files."""
    extra = set(p.name for p in out.glob("*.jsonl")) - set(files)
    changed = {name for name, data in files.items() if not (out / name).is_file() or (out / name).read_bytes() != data}
    return sorted(extra | changed)


@lru_cache(maxsize=None)
def task_data_dir(corpus_seed: int = 0) -> Path:
    """The data dir of a corpus world's local tasks: the shipped one for corpus_seed 0, else written once
    per process into a temporary dir (removed at exit); the generators take about 1.5 s for all of them."""
    if int(corpus_seed) == SHIPPED_CORPUS_SEED:
        return local_data().DATA_DIR
    out = Path(tempfile.mkdtemp(prefix=f"pdl-task-data-seed{int(corpus_seed)}-"))
    atexit.register(shutil.rmtree, out, ignore_errors=True)
    write_files(out, dataset_files(int(corpus_seed)))
    return out
