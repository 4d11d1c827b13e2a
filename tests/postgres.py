"""A throwaway PostgreSQL server for the store tests: `initdb` into a temporary folder, `pg_ctl start` on a
free loopback port with its socket in that folder, stopped and deleted afterwards.

Debian's server binaries (`apt-get install postgresql`: /usr/lib/postgresql/<version>/bin) are used; as
root, they run as the `postgres` user (PostgreSQL refuses to run as root). Without them the tests skip,
unless `ANOMALYVFM_REQUIRE_POSTGRES=1` (CI), where they fail instead.
"""
from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
from servers import free_port

REQUIRE_ENV = "ANOMALYVFM_REQUIRE_POSTGRES"


def server_binaries() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"), key=lambda p: int(p.split("/")[4]))
    if found:
        return Path(found[-1]).parent
    pg_ctl = shutil.which("pg_ctl")
    return Path(pg_ctl).parent if pg_ctl else None


class PostgresServer:
    """One cluster: `start()`, `stop()` (fast: connections are cut, as in an outage), `url`."""

    def __init__(self) -> None:
        self.bin = server_binaries()
        if self.bin is None:
            message = "PostgreSQL server binaries not found (apt-get install postgresql)"
            if os.environ.get(REQUIRE_ENV) == "1":
                pytest.fail(f"{message}; {REQUIRE_ENV}=1 requires them")
            pytest.skip(message)
        self.root = Path(tempfile.mkdtemp(prefix="anomalyvfm-pg-"))
        self.user = "postgres" if os.geteuid() == 0 else None
        if self.user:
            entry = pwd.getpwnam(self.user)
            os.chown(self.root, entry.pw_uid, entry.pw_gid)
        self.data, self.port = self.root / "data", free_port()
        self.url = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"
        self._run("initdb", "-D", str(self.data), "-A", "trust", "-U", "postgres", "-E", "UTF8", "--no-sync")

    def _run(self, tool: str, *args: str) -> None:
        command = [str(self.bin / tool), *args]
        if self.user:
            command = ["runuser", "-u", self.user, "--", *command]
        done = subprocess.run(command, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, f"{tool} failed: {done.stdout}{done.stderr}"

    def start(self) -> None:
        options = f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off"
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.root / "log"), "-w", "-o", options, "start")

    def stop(self) -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop")

    def close(self) -> None:
        if (self.data / "postmaster.pid").exists():
            self.stop()
        shutil.rmtree(self.root, ignore_errors=True)

    def new_database(self, name: str) -> str:
        """A fresh empty database on this server; its URL."""
        import psycopg

        with psycopg.connect(f"postgresql://postgres@127.0.0.1:{self.port}/postgres", autocommit=True) as connection:
            connection.execute(f'CREATE DATABASE "{name}"')
        return f"postgresql://postgres@127.0.0.1:{self.port}/{name}"
