"""A real PostgreSQL server for the tests: Debian's binaries (``initdb`` + ``pg_ctl``, installed by
scripts/setup-postgres.sh) in a temporary directory, on a free port of 127.0.0.1, with a random
password (no trust authentication: other users of the machine cannot connect). As root, the server
runs as an unprivileged user (``postgres`` when it exists, else ``nobody``): PostgreSQL refuses root.

Each test gets a database of its own (:meth:`Postgres.new_database`)."""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import secrets
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from .server import free_port

SUPERUSER = "swapserve"


def postgres_bin() -> Path | None:
    """The newest installed PostgreSQL's bin directory (Debian keeps them by major version)."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[-3]))
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


def postgres_available() -> str | None:
    """Why a PostgreSQL server cannot be started here, or None."""
    if postgres_bin() is None:
        return "PostgreSQL is not installed (bash scripts/setup-postgres.sh installs Debian's postgresql as root)"
    try:
        import psycopg  # noqa: F401
    except ImportError:
        return "psycopg is not installed (pip install 'jupyter-swapserve[postgres]')"
    return None


def _run_as() -> str | None:
    """The account to run the server under when we are root (PostgreSQL refuses to run as root)."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        with contextlib.suppress(KeyError):
            pwd.getpwnam(name)
            return name
    raise RuntimeError("running as root and no unprivileged account (postgres, nobody) to run PostgreSQL as")


@dataclass
class Postgres:
    host: str
    port: int
    password: str
    workdir: Path
    bindir: Path
    user: str | None
    started_seconds: float  # initdb + start, as measured

    def url(self, database: str = "postgres") -> str:
        return f"postgresql+psycopg://{SUPERUSER}:{self.password}@{self.host}:{self.port}/{database}"

    def new_database(self, prefix: str = "swapserve") -> str:
        """A fresh, empty database; its SQLAlchemy URL."""
        import psycopg

        name = f"{prefix}_{secrets.token_hex(4)}"
        with psycopg.connect(host=self.host, port=self.port, user=SUPERUSER, password=self.password,
                             dbname="postgres", autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def log(self) -> str:
        path = self.workdir / "postgres.log"
        return path.read_text(errors="replace")[-4000:] if path.exists() else ""


def _command(user: str | None, argv: list[str]) -> list[str]:
    if user is None:
        return argv
    return ["setpriv", f"--reuid={user}", f"--regid={pwd.getpwnam(user).pw_gid}", "--init-groups", "--", *argv]


@contextlib.contextmanager
def run_postgres() -> Iterator[Postgres]:
    bindir = postgres_bin()
    assert bindir is not None, postgres_available()
    user = _run_as()
    workdir = Path(tempfile.mkdtemp(prefix="swapserve-pg-"))
    password = secrets.token_hex(16)
    (workdir / "pwfile").write_text(password + "\n")
    if user is not None:
        account = pwd.getpwnam(user)
        for path in (workdir, workdir / "pwfile"):
            os.chown(path, account.pw_uid, account.pw_gid)
    port = free_port()
    data = workdir / "data"
    env = {**os.environ, "LC_ALL": "C", "TZ": "UTC"}
    started = time.perf_counter()
    subprocess.run(_command(user, [str(bindir / "initdb"), "-D", str(data), "-U", SUPERUSER,
                                   f"--pwfile={workdir / 'pwfile'}", "--auth=scram-sha-256", "-E", "UTF8",
                                   "--no-sync", "--no-instructions"]),
                   check=True, env=env, capture_output=True, cwd=workdir)
    # fsync off: a test database need not survive a power cut, and the shared machine's disk is slow
    options = f"-c listen_addresses=127.0.0.1 -p {port} -c unix_socket_directories={workdir} -c fsync=off " \
              "-c synchronous_commit=off -c full_page_writes=off -c max_connections=200"
    subprocess.run(_command(user, [str(bindir / "pg_ctl"), "-D", str(data), "-l", str(workdir / "postgres.log"),
                                   "-o", options, "-w", "-t", "60", "start"]),
                   check=True, env=env, capture_output=True, cwd=workdir)
    pg = Postgres("127.0.0.1", port, password, workdir, bindir, user, time.perf_counter() - started)
    try:
        yield pg
    finally:
        subprocess.run(_command(user, [str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop"]),
                       env=env, capture_output=True, cwd=workdir)
        shutil.rmtree(workdir, ignore_errors=True)
