"""The code version a run records: the package version and the git commit of the source that ran.

`COMMIT` is stamped by `git archive` (`.gitattributes`: `pd_lightning/_source.py export-subst`), so an
install from an exported tarball knows its commit with no git at hand. In a checkout the string is
still the placeholder, and the commit is asked of git in the package's own directory, but only when
that directory is the checkout's tracked source (its `__init__.py` is a file git knows): a wheel
installed into a venv that happens to sit inside some other repository must not claim that
repository's HEAD. Anything else is "unknown". MLflow shows the commit as the run's source
(`mlflow.source.git.commit`), on every training run and on a sweep's parent run.
"""

from __future__ import annotations

import functools
import re
import subprocess
from pathlib import Path

COMMIT = "$Format:%H$"
UNKNOWN = "unknown"
COMMIT_TAG = "mlflow.source.git.commit"  # MLflow's own tag: the UI shows it under the run's source
VERSION_TAG = "pd.version"
_HEX = re.compile(r"^[0-9a-f]{40}$")


def commit_of(stamped: str, directory: Path) -> str:
    """The commit `stamped` names (a `git archive` export), else git's HEAD for `directory`, else "unknown"."""
    if _HEX.match(stamped.strip()):
        return stamped.strip()
    try:
        tracked = subprocess.run(["git", "-C", str(directory), "ls-files", "--error-unmatch", "__init__.py"],
                                 capture_output=True, text=True, timeout=10)
        if tracked.returncode != 0:  # not a work tree, or not this package's tracked source
            return UNKNOWN
        head = subprocess.run(["git", "-C", str(directory), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=10)
    except (OSError, subprocess.SubprocessError):  # no git installed, or it hung
        return UNKNOWN
    commit = head.stdout.strip()
    return commit if head.returncode == 0 and _HEX.match(commit) else UNKNOWN


@functools.lru_cache(maxsize=1)
def source_commit() -> str:
    """The git commit of this package's source (see the module docstring); "unknown" when it cannot be known."""
    return commit_of(COMMIT, Path(__file__).resolve().parent)


@functools.lru_cache(maxsize=1)
def package_version() -> str:
    """The installed distribution's version (importlib.metadata), else the package's own `__version__`."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("pd-lightning")
    except PackageNotFoundError:
        from pd_lightning import __version__

        return __version__


def source_tags() -> dict[str, str]:
    """The tags that say which code made a run: the git commit (MLflow's source tag) and the package version."""
    return {COMMIT_TAG: source_commit(), VERSION_TAG: package_version()}
