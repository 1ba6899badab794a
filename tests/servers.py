"""Real servers for the scale-out tests: a PostgreSQL cluster and an MLflow tracking server, loopback only.

Session fixtures (import them into a conftest; `tests/conftest.py` does):

    postgres_server   a throw-away PostgreSQL cluster (initdb in a temp dir, 127.0.0.1 on a free port,
                      password auth, its unix socket inside the temp dir); `.url(db)`, `.create_database(db)`
    postgres_url      `postgresql+psycopg2://pdl:<password>@127.0.0.1:<port>/optuna`, an empty database
                      for Optuna's RDBStorage (or any SQLAlchemy user)
    mlflow_server     `http://127.0.0.1:<port>`: `mlflow server` with its own PostgreSQL database as the
                      backend store and a file:// artifact root in a temp dir

The PostgreSQL binaries come from the system (Debian: `apt-get install postgresql`; found on PATH,
in $PDL_PG_BIN or in /usr/lib/postgresql/*/bin). Without them the tests that use these fixtures
skip with that reason; set PDL_REQUIRE_SERVERS=1 to make that an error instead (CI on a machine
that has them). As root, the cluster runs as the `postgres` user (initdb refuses root).
"""

from __future__ import annotations

import glob
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

PG_PROGRAMS = ("initdb", "pg_ctl", "postgres")
STARTUP_TIMES: dict[str, float] = {}  # fixture -> seconds it took to start (reported by the tests)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def find_pg_bin() -> Path | None:
    """The directory holding initdb, pg_ctl and postgres, or None when PostgreSQL is not installed."""
    candidates = []
    if os.environ.get("PDL_PG_BIN"):
        candidates.append(Path(os.environ["PDL_PG_BIN"]))
    if shutil.which("pg_ctl"):
        candidates.append(Path(shutil.which("pg_ctl")).resolve().parent)  # Debian links into the versioned dir
    candidates += [Path(p) for p in sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=_version_key, reverse=True)]
    for d in candidates:
        if all((d / prog).is_file() for prog in PG_PROGRAMS):
            return d
    return None


def _version_key(path: str) -> tuple[int, ...]:
    version = Path(path).parent.name
    return tuple(int(x) for x in version.split(".") if x.isdigit())


def skip_or_fail(reason: str) -> None:
    """Skip (the default) or fail (PDL_REQUIRE_SERVERS=1) a test whose server cannot be started."""
    if os.environ.get("PDL_REQUIRE_SERVERS") == "1":
        pytest.fail(f"{reason} (PDL_REQUIRE_SERVERS=1)", pytrace=False)
    pytest.skip(reason)


def _unprivileged_user() -> str | None:
    """As root: the user the cluster runs as (postgres, else nobody); None when not root."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        try:
            pwd.getpwnam(name)
            return name
        except KeyError:
            continue
    raise RuntimeError("running as root and neither a 'postgres' nor a 'nobody' user exists to run PostgreSQL as")


class PostgresServer:
    """A PostgreSQL cluster in a temp dir, listening on 127.0.0.1 only, password (scram) auth over TCP."""

    user = "pdl"

    def __init__(self, bin_dir: Path):
        self.bin_dir = bin_dir
        self.password = secrets.token_hex(12)
        self.run_as = _unprivileged_user()
        # Not under pytest's tmp dir: that is mode 0700 for root, and the cluster runs as another user.
        self.root = Path(tempfile.mkdtemp(prefix="pdl-pg-"))
        self.data, self.sockets, self.log = self.root / "data", self.root / "sock", self.root / "postgres.log"
        self.port = 0

    def _cmd(self, *args: str | Path) -> list[str]:
        prefix = ["runuser", "-u", self.run_as, "--"] if self.run_as else []
        return [*prefix, *(str(a) for a in args)]

    def _run(self, *args: str | Path, timeout: float = 120) -> None:
        proc = subprocess.run(self._cmd(*args), capture_output=True, text=True, timeout=timeout, cwd=self.root)
        if proc.returncode:
            raise RuntimeError(f"{Path(str(args[0])).name} failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}\n"
                               f"{self._log_tail()}")

    def _log_tail(self) -> str:
        return self.log.read_text(errors="replace")[-2000:] if self.log.is_file() else ""

    def start(self) -> "PostgresServer":
        """initdb + pg_ctl start (waits until it accepts connections)."""
        self.sockets.mkdir()
        pwfile = self.root / "pwfile"
        pwfile.write_text(self.password + "\n")
        if self.run_as:
            pw = pwd.getpwnam(self.run_as)
            for p in (self.root, self.sockets, pwfile):
                os.chown(p, pw.pw_uid, pw.pw_gid)
        self._run(self.bin_dir / "initdb", "-D", self.data, "-U", self.user, f"--pwfile={pwfile}", "-E", "UTF8",
                  "--locale=C", "--auth-local=trust", "--auth-host=scram-sha-256", "--no-sync")
        pwfile.unlink()
        for attempt in range(3):  # a free port can be taken between the probe and the bind
            self.port = free_port()
            try:
                self._pg_ctl_start()
                return self
            except RuntimeError:
                if attempt == 2:
                    raise
        return self

    def _pg_ctl_start(self) -> None:
        opts = (f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.sockets} "
                "-c fsync=off -c synchronous_commit=off -c full_page_writes=off "  # a test cluster: no crash safety
                # every sweep worker, coordinator and MLflow server holds a pool: the default 100 ran out when
                # test files shared one cluster in a parallel (pytest -n 2) run
                "-c max_connections=300")
        self._run(self.bin_dir / "pg_ctl", "-D", self.data, "-l", self.log, "-o", opts, "-w", "-t", "60", "start")

    def pause(self) -> None:
        """Stop the server as an outage would (fast shutdown: clients are cut off), keeping its files for `resume`."""
        self._run(self.bin_dir / "pg_ctl", "-D", self.data, "-m", "fast", "-w", "-t", "60", "stop")

    def resume(self) -> None:
        """Start a paused server again, on the same port with the same databases."""
        self._pg_ctl_start()

    def stop(self) -> None:
        """Fast shutdown and remove the cluster's files."""
        try:
            if (self.data / "postmaster.pid").exists():
                self._run(self.bin_dir / "pg_ctl", "-D", self.data, "-m", "fast", "-w", "-t", "60", "stop")
        finally:
            shutil.rmtree(self.root, ignore_errors=True)

    def url(self, database: str, driver: str = "postgresql+psycopg2") -> str:
        """SQLAlchemy URL of one database of this cluster."""
        return f"{driver}://{self.user}:{self.password}@127.0.0.1:{self.port}/{database}"

    def connect(self, database: str = "postgres"):
        """A psycopg2 connection over TCP (what every client of the fixtures uses)."""
        import psycopg2

        return psycopg2.connect(host="127.0.0.1", port=self.port, user=self.user, password=self.password,
                                dbname=database, connect_timeout=10)

    def create_database(self, name: str) -> str:
        """CREATE DATABASE name; returns its SQLAlchemy URL."""
        conn = self.connect()
        try:
            conn.autocommit = True  # CREATE DATABASE cannot run inside a transaction
            with conn.cursor() as cur:
                cur.execute(f'CREATE DATABASE "{name}"')
        finally:
            conn.close()
        return self.url(name)


def mlflow_executable() -> list[str]:
    """The `mlflow` command of this interpreter's environment."""
    beside = Path(sys.executable).parent / "mlflow"
    return [str(beside)] if beside.is_file() else [shutil.which("mlflow") or "mlflow"]


class MlflowServer:
    """`mlflow server` on 127.0.0.1 with a database backend store, in its own process group."""

    def __init__(self, backend_store_uri: str, root: Path):
        self.backend_store_uri, self.root = backend_store_uri, root
        self.artifacts = root / "artifacts"
        self.log = root / "mlflow-server.log"
        self.port = 0
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 180, port: int | None = None) -> "MlflowServer":
        """Start (on `port`, e.g. the one of a stopped run of it, or a free one) and wait until GET /health
        answers 200 (schema migrations run on first start)."""
        self.artifacts.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        cmd = [*mlflow_executable(), "server", "--backend-store-uri", self.backend_store_uri,
               "--default-artifact-root", self.artifacts.as_uri(), "--host", "127.0.0.1", "--port", str(self.port),
               "--workers", "1"]
        # No job runner: it serves GenAI scorer jobs with ~7 Huey consumer processes we never use.
        env = dict(os.environ, MLFLOW_HTTP_REQUEST_TIMEOUT="30", MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=self.root, env=env,
                                         start_new_session=True)  # own group: stop() ends its workers too
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited with {self.proc.returncode}:\n{self._log_tail()}")
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=5) as resp:
                    if resp.status == 200:
                        return self
            except OSError:
                pass
            time.sleep(0.25)
        self.stop()
        raise RuntimeError(f"mlflow server did not answer /health within {timeout:.0f}s:\n{self._log_tail()}")

    def _log_tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:] if self.log.is_file() else ""

    def stop(self) -> None:
        """SIGTERM to the server's process group, SIGKILL after 20 s."""
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """A PostgreSQL cluster for the session (127.0.0.1, free port); skips if PostgreSQL is not installed."""
    bin_dir = find_pg_bin()
    if bin_dir is None:
        skip_or_fail("PostgreSQL server binaries (initdb, pg_ctl, postgres) not found; install PostgreSQL "
                     "(Debian: apt-get install postgresql) or set PDL_PG_BIN to its bin directory")
    started = time.perf_counter()
    server = PostgresServer(bin_dir)
    try:
        server.start()
    except BaseException:
        server.stop()
        raise
    STARTUP_TIMES["postgres_server"] = time.perf_counter() - started
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def postgres_url(postgres_server: PostgresServer) -> str:
    """`postgresql+psycopg2://...` URL of an empty database (`optuna`) on the session's cluster."""
    started = time.perf_counter()
    url = postgres_server.create_database("optuna")
    STARTUP_TIMES["postgres_url"] = time.perf_counter() - started
    return url


@pytest.fixture(scope="session")
def mlflow_server(postgres_server: PostgresServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`http://127.0.0.1:PORT` of an MLflow tracking server backed by its own PostgreSQL database."""
    started = time.perf_counter()
    backend = postgres_server.create_database("mlflow")  # its own database: MLflow and Optuna both keep alembic_version
    server = MlflowServer(backend, tmp_path_factory.mktemp("mlflow-server"))
    server.start()
    STARTUP_TIMES["mlflow_server"] = time.perf_counter() - started
    try:
        yield server.url
    finally:
        server.stop()
