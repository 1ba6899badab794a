"""`python -m pd_lightning.evaluation.write_task_data`: write (or check) the local lm-eval tasks' item files.

    python -m pd_lightning.evaluation.write_task_data            # rewrite pd_lightning/eval_tasks/tasks/data
    python -m pd_lightning.evaluation.write_task_data --check    # exit 1 when those files differ from the generators
    python -m pd_lightning.evaluation.write_task_data --corpus-seed 1 --out DIR   # another corpus world

A module of its own (not `task_data`, which the package imports) so `python -m` runs it without a
second copy of an already imported module. Bad input: one line on stderr, exit 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pd_lightning.errors import ConfigError, DataError, UserError
from pd_lightning.evaluation.task_data import (REGENERATE, SHIPPED_CORPUS_SEED, dataset_files, differing_files,
                                               local_data, write_files)


def main(argv: list[str] | None = None) -> int:
    """Write or check a local task data dir; returns the exit code (0, 1: files differ, 2: bad input)."""
    parser = argparse.ArgumentParser(
        prog="python -m pd_lightning.evaluation.write_task_data",
        description="Write (or check) the local lm-eval tasks' items as JSON-lines files.",
        epilog="examples:\n  python -m pd_lightning.evaluation.write_task_data\n"
               "  python -m pd_lightning.evaluation.write_task_data --check\n"
               "  python -m pd_lightning.evaluation.write_task_data --corpus-seed 1 --out /tmp/world1",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus-seed", type=int, default=0, help="the built-in corpus's world (default 0, shipped)")
    parser.add_argument("--out", type=Path, default=None, help=f"data dir to write (default: {local_data().DATA_DIR})")
    parser.add_argument("--check", action="store_true", help="compare instead of writing; exit 1 on a difference")
    args = parser.parse_args(argv)
    out = args.out or local_data().DATA_DIR
    try:
        if args.corpus_seed != SHIPPED_CORPUS_SEED and out.resolve() == local_data().DATA_DIR and not args.check:
            raise ConfigError(f"--corpus-seed={args.corpus_seed} needs --out DIR: the shipped task data in {out} is "
                              f"corpus_seed {SHIPPED_CORPUS_SEED}, which the task YAMLs read by default")
        if out.exists() and not out.is_dir():
            raise DataError(f"--out={str(out)!r} is a file; expected a directory for the task data files")
        files = dataset_files(args.corpus_seed)
        if args.check:
            differ = differing_files(out, files) if out.is_dir() else sorted(files)
            print(f"task data in {out}: " + (f"{len(differ)} file(s) differ: {', '.join(differ)}; run {REGENERATE}"
                                             if differ else f"{len(files)} files match the generators"))
            return 1 if differ else 0
        write_files(out, files)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code
    print(f"task data: wrote {len(files)} files (corpus_seed {args.corpus_seed}) to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
