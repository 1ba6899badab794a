"""When a server a sweep needs stops answering: the Optuna storage or the MLflow tracking server.

A sweep does not guess. After any error it cannot attribute to the configuration it asks the servers
directly (`SELECT 1` on the storage, `GET /health` on the tracking server); if one does not answer, the
error is that server's outage (`ServerUnreachable`): the worker records what it can, stops, and the
coordinator stops the sweep with one line naming the server. Running the same command again once the
server is back resumes every interrupted trial from its checkpoint, in the same MLflow run.

Why stop rather than wait or carry on: without the storage a worker cannot claim, finish or heartbeat a
trial (and others would re-run a trial whose heartbeat went stale); without MLflow no result can be kept.
Short blips are absorbed below this level (the MLflow client retries, the storage re-connects).
"""

from __future__ import annotations

import re

from pd_lightning.errors import UserError

PROBE_TIMEOUT_S = 5


class ServerUnreachable(UserError):
    """A server the sweep needs does not answer; running the same command again later continues. Exit code 3."""

    exit_code = 3


def redact(url: str) -> str:
    """`scheme://user:secret@host/...` -> `scheme://user:***@host/...` (URLs are shown in errors and logs)."""
    return re.sub(r"://([^:/@]+):[^@]*@", r"://\1:***@", url)


def one_line(exc: BaseException) -> str:
    """An exception as one line: a UserError's own message, else `Type: message` (first 300 characters)."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if isinstance(exc, UserError) else f"{type(exc).__name__}: {text}"[:300]


def storage_answers(url: str) -> bool:
    """Whether the Optuna storage's database answers now (a sqlite file always does)."""
    if url.startswith("sqlite"):
        return True
    import sqlalchemy
    from sqlalchemy.pool import NullPool

    args = {"connect_timeout": PROBE_TIMEOUT_S} if url.startswith("postgresql") else {}
    engine = sqlalchemy.create_engine(url, poolclass=NullPool, connect_args=args)
    try:
        with engine.connect() as conn:
            conn.execute(sqlalchemy.text("SELECT 1"))
        return True
    except Exception:  # any failure to connect or to answer is the answer
        return False
    finally:
        engine.dispose()


def tracking_answers(uri: str) -> bool:
    """Whether the MLflow tracking server answers `GET /health` now (a local sqlite or file store always does)."""
    if not uri.startswith(("http://", "https://")):
        return True
    import urllib.request

    try:
        with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=PROBE_TIMEOUT_S) as resp:
            return resp.status == 200
    except OSError:  # refused, timed out, HTTP error
        return False


def storage_down(url: str, cause: BaseException | str) -> ServerUnreachable:
    """The error of an Optuna storage that does not answer (its password redacted)."""
    why = cause if isinstance(cause, str) else one_line(cause)
    return ServerUnreachable(f"the Optuna storage {redact(url)} is unreachable ({why}); the sweep stopped: run the "
                             "same command again once it answers (finished trials are kept, interrupted ones resume)")


def tracking_down(uri: str, cause: BaseException | str) -> ServerUnreachable:
    """The error of an MLflow tracking server that does not answer."""
    why = cause if isinstance(cause, str) else one_line(cause)
    return ServerUnreachable(f"the MLflow tracking server {redact(uri)} is unreachable ({why}); the sweep stopped: run "
                             "the same command again once it answers (finished trials are kept, interrupted ones "
                             "resume)")


def outage_behind(exc: BaseException, storage_url: str, tracking_uri: str) -> ServerUnreachable | None:
    """The outage that explains `exc`, if a server does not answer now; None when both answer.

    A UserError other than an outage is the configuration's own fault, whatever the servers do.
    """
    if isinstance(exc, ServerUnreachable):
        return exc
    if isinstance(exc, UserError):
        return None
    if not storage_answers(storage_url):
        return storage_down(storage_url, exc)
    if not tracking_answers(tracking_uri):
        return tracking_down(tracking_uri, exc)
    return None
