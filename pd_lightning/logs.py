"""Human output of the lab: one `logging` handler on the `pd_lightning` logger, writing plain lines to stderr.

Modules log through `log = logging.getLogger(__name__)` (so every logger is a child of `pd_lightning`) and
never print status; stdout is kept for what a command is asked for (tables, JSON, paths). Whoever runs the
lab decides how much it says: `pdl` calls `setup()` once (level INFO, or WARNING with `--json`), a library
user configures `logging` as usual, and a caller that wants silence raises the level, e.g.
`logging.getLogger("pd_lightning").setLevel(logging.WARNING)`, instead of threading `quiet=` flags through.

Progress of long loops stays a rich bar on a terminal and plain lines otherwise (`progress.ProgressBar`),
written through this logger when not on a terminal.
"""

from __future__ import annotations

import logging
import os
import sys

LOGGER = "pd_lightning"
_HANDLER_MARK = "_pdl_handler"


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever `sys.stderr` is at each record, not the stream of the first `setup()` call
    (a test runner or a notebook swaps stderr; a handler bound to a closed one would lose every line)."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:  # StreamHandler.__init__ assigns it; the property always answers sys.stderr
        pass


def setup(level: int = logging.INFO, stream=None) -> logging.Logger:
    """Give the `pd_lightning` logger its one stderr handler (idempotent: a second call only sets the level)."""
    root = logging.getLogger(LOGGER)
    root.setLevel(level)
    if not any(getattr(h, _HANDLER_MARK, False) for h in root.handlers):
        handler = logging.StreamHandler(stream) if stream is not None else _StderrHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        setattr(handler, _HANDLER_MARK, True)
        root.addHandler(handler)
        root.propagate = False  # one line per message, not a second copy through a host's root handler
    return root


def quiet_libraries() -> None:
    """Our own progress lines are enough: silence per-file bars and tips of the libraries we call.

    Environment variables only, read by transformers and huggingface_hub when they are imported, so a
    command that never loads a model (`pdl config show`) does not pay their import here.
    """
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # transformers' own bars follow this at import
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
