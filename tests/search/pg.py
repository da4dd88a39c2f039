"""A throwaway local PostgreSQL server for tests: a private cluster in a temp dir, on a free port.

Uses Debian's PostgreSQL binaries (`/usr/lib/postgresql/<version>/bin`, or `initdb` on PATH). Root
cannot run `initdb`, so as root the server runs as the `postgres` user. Durability is off (fsync,
no WAL sync): the data lives only as long as the test module.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path


class PostgresUnavailable(RuntimeError):
    """PostgreSQL cannot be started here (no binaries, no `postgres` user, or it failed to start)."""


def find_bin_dir() -> Path:
    found = shutil.which("initdb")
    if found:
        return Path(found).resolve().parent  # /usr/local/bin may hold symlinks to a few of them
    versions = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: int(p.parts[-3]))
    if not versions:
        raise PostgresUnavailable("PostgreSQL is not installed (no initdb in PATH or /usr/lib/postgresql)")
    return versions[-1].parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def as_server_user(cmd: list[str]) -> list[str]:
    """Root cannot run PostgreSQL: run `cmd` as the `postgres` user then."""
    if os.geteuid() != 0:
        return cmd
    if shutil.which("runuser") is None:
        raise PostgresUnavailable("running as root without `runuser` to drop to the postgres user")
    try:
        import pwd

        pwd.getpwnam("postgres")
    except KeyError:
        raise PostgresUnavailable(
            "running as root and there is no `postgres` user to run the server"
        ) from None
    return ["runuser", "-u", "postgres", "--", *cmd]


def run(cmd: list[str], what: str) -> None:
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    if done.returncode != 0:
        raise PostgresUnavailable(
            f"{what} failed ({done.returncode}): {(done.stderr or done.stdout).strip()}"
        )


@contextlib.contextmanager
def postgres_server(database: str = "nas") -> Iterator[str]:
    """Start a private PostgreSQL cluster; yield a SQLAlchemy URL (psycopg 3 driver); stop and delete it."""
    bin_dir = find_bin_dir()
    root = Path(tempfile.mkdtemp(prefix="nas-pg-"))  # not under pytest's tmp: that is private to root
    data, port = root / "data", free_port()
    if os.geteuid() == 0:
        shutil.chown(root, user="postgres", group="postgres")
    try:
        run(
            as_server_user(
                [
                    str(bin_dir / "initdb"),
                    "-D",
                    str(data),
                    "-U",
                    "postgres",
                    "-A",
                    "trust",
                    "-E",
                    "UTF8",
                    "--no-sync",
                ]
            ),
            "initdb",
        )
        options = f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off -c synchronous_commit=off -c full_page_writes=off"
        run(
            as_server_user(
                [
                    str(bin_dir / "pg_ctl"),
                    "-D",
                    str(data),
                    "-o",
                    options,
                    "-l",
                    str(root / "server.log"),
                    "-w",
                    "-t",
                    "30",
                    "start",
                ]
            ),
            "pg_ctl start",
        )
        try:
            run(
                [str(bin_dir / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", database],
                "createdb",
            )
            yield f"postgresql+psycopg://postgres@127.0.0.1:{port}/{database}"
        finally:
            subprocess.run(
                as_server_user([str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop"]),
                capture_output=True,
                timeout=60,
            )
    finally:
        shutil.rmtree(root, ignore_errors=True)
