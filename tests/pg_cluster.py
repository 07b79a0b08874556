"""A throwaway PostgreSQL cluster from Debian's `postgresql` binaries, for the registry tests.

initdb and postgres refuse to run as root, so as root they run as `nobody` (`runuser`), in a
directory of their own under /tmp (pytest's tmp dirs are 0700 root). Trust auth, loopback and a
socket inside that directory only; stopped (immediate) and removed at the end of the session.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
import uuid
from pathlib import Path

from cortex.net import free_port

USER = "cortex"  # the cluster's superuser, as initdb -U names it
INSTALL = "scripts/apt-install pg_ctlcluster=postgresql (as root; `./dev test` runs it)"


class PostgresMissing(RuntimeError):
    pass


def find_bindir() -> Path:
    """The newest /usr/lib/postgresql/N/bin that has initdb, pg_ctl and postgres."""
    found = sorted(
        (Path(p).parent for p in glob.glob("/usr/lib/postgresql/*/bin/initdb")),
        key=lambda d: int(d.parent.name) if d.parent.name.isdigit() else 0,
    )
    found = [d for d in found if (d / "pg_ctl").is_file() and (d / "postgres").is_file()]
    if not found:
        raise PostgresMissing(f"PostgreSQL is not installed (no /usr/lib/postgresql/*/bin/initdb); {INSTALL}")
    return found[-1]


class PostgresCluster:
    def __init__(self) -> None:
        self.bindir = find_bindir()
        self.root = Path(tempfile.mkdtemp(prefix="cortex-pg-"))
        self.data = self.root / "data"
        self.log_path = self.root / "postgres.log"
        self.port = free_port()
        self._as: list[str] = []
        if os.geteuid() == 0:
            nobody = pwd.getpwnam("nobody")
            os.chown(self.root, nobody.pw_uid, nobody.pw_gid)
            self._as = ["runuser", "-u", "nobody", "--"]
        self.started = False

    def _run(self, *args: str) -> None:
        done = subprocess.run(
            [*self._as, *args],
            cwd=self.root,
            capture_output=True,
            text=True,
            timeout=120,
            env={**os.environ, "LC_ALL": "C"},
        )
        if done.returncode != 0:
            log = self.log_path.read_text(errors="replace")[-2000:] if self.log_path.exists() else ""
            raise RuntimeError(f"{' '.join(args)} failed ({done.returncode}):\n{done.stdout}{done.stderr}{log}")

    def start(self) -> "PostgresCluster":
        """initdb (the first time), then start the server and wait until it accepts connections."""
        if not self.data.exists():
            self._run(
                str(self.bindir / "initdb"),
                "-D",
                str(self.data),
                "--auth=trust",
                "-U",
                USER,
                "--no-locale",
                "-E",
                "UTF8",
                "--no-sync",
            )
        options = f"-k {self.root} -p {self.port} -c listen_addresses=127.0.0.1 -c fsync=off"
        self.started = True
        self._run(
            str(self.bindir / "pg_ctl"),
            "-D",
            str(self.data),
            "-l",
            str(self.log_path),
            "-w",
            "-t",
            "60",
            "-o",
            options,
            "start",
        )
        return self

    def halt(self) -> None:
        """Stop the server, keeping its data (an outage; `start` brings it back on the same port)."""
        self._run(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "stop")

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://{USER}@127.0.0.1:{self.port}/{database}"

    def new_database(self) -> str:
        """A fresh, empty database's URL (one per test keeps tests apart)."""
        import psycopg

        name = "t_" + uuid.uuid4().hex[:12]
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}")
        return self.url(name)

    def stop(self) -> None:
        try:
            if self.started and (self.data / "postmaster.pid").exists():
                self._run(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "-w", "stop")
        finally:
            shutil.rmtree(self.root, ignore_errors=True)
