"""Datasets of the local tasks, read from the JSON-lines files in `data/` beside this file.

Self-contained on purpose (json, pathlib and the `datasets` library lm-eval itself needs): lm-eval loads
this file by its path (`custom_dataset: !function _local_data.load` in a task YAML), so the task YAMLs of
this directory run with plain `lm_eval --include_path <this dir>` where pd_lightning is not installed.
Why not lm-eval's `dataset_path: json` + `dataset_kwargs: {data_files: ...}`: `datasets` resolves a
relative `data_files` against the working directory, not against the YAML, so the tasks would run from
one directory only; an absolute path would tie them to one installation.

`data/manifest.json` names each dataset's splits and item counts and the corpus world (`corpus_seed`)
the files were made for. Files and manifest are written by `python -m pd_lightning.evaluation.write_task_data`
from the built-in corpus's generators. Another corpus world: write its files with
`python -m pd_lightning.evaluation.write_task_data --corpus-seed 1 --out DIR`, then pass
`--metadata '{"corpus_seed": 1, "data_dir": "DIR"}'` to lm_eval.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

DATA_DIR = Path(__file__).resolve().parent / "data"
MANIFEST = "manifest.json"


def split_file(dataset: str, split: str) -> str:
    """The file name of one split of a dataset: `<dataset>.<split>.jsonl`."""
    return f"{dataset}.{split}.jsonl"


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The items of a JSON-lines file, in file order."""
    with path.open(encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def read_manifest(root: Path) -> dict[str, Any]:
    """A data dir's manifest: {"corpus_seed": int, "datasets": {name: {split: item count}}}."""
    path = root / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"local task data dir {str(root)!r} has no {MANIFEST}; write one with "
                                "`python -m pd_lightning.evaluation.write_task_data --out DIR`")
    return json.loads(path.read_text(encoding="utf-8"))


def load(dataset: str, corpus_seed: int = 0, data_dir: str | None = None, **_: Any):
    """One local dataset as a DatasetDict of its splits (lm-eval passes the task's metadata and dataset_kwargs).

    `data_dir` (task metadata) points at files of another corpus world; the manifest's corpus_seed must
    be the one asked for, so a world's items are never scored as another's.
    """
    import datasets

    root = Path(data_dir) if data_dir else DATA_DIR
    manifest = read_manifest(root)
    if int(manifest["corpus_seed"]) != int(corpus_seed):
        raise ValueError(f"corpus_seed={corpus_seed!r}: the local task data in {str(root)!r} is for corpus_seed="
                         f"{manifest['corpus_seed']}; write that world's files with `python -m "
                         f"pd_lightning.evaluation.write_task_data --corpus-seed {corpus_seed} --out DIR` and pass "
                         f"data_dir=DIR in the task metadata")
    splits = manifest["datasets"].get(dataset)
    if splits is None:
        raise ValueError(f"dataset={dataset!r} is not in {str(root / MANIFEST)!r}; expected one of "
                         f"{', '.join(sorted(manifest['datasets']))}")
    # from_list on the parsed lines: the same Dataset the generators' item lists made in memory.
    return datasets.DatasetDict({split: datasets.Dataset.from_list(read_jsonl(root / split_file(dataset, split)))
                                 for split in splits})
