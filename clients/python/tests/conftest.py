"""Starts the real `deadbolt serve` (the binary in $DEADBOLT_BIN, which
`cargo test` sets to the one it built) for the tests."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
from pathlib import Path
from typing import Iterator, List, Optional

import pytest


class Server:
    """A `deadbolt serve` process on a loopback port of its own."""

    def __init__(
        self, data_dir: Path, port: int = 0, quic: bool = False, extra: Optional[List[str]] = None
    ) -> None:
        binary = os.environ.get("DEADBOLT_BIN")
        if not binary:
            pytest.fail("DEADBOLT_BIN must name the deadbolt binary (cargo test sets it)")
        self.binary = binary
        self.data_dir = data_dir
        self.port = port
        self.url = ""
        self.quic = quic
        self.quic_url = ""
        #: More flags for `deadbolt serve` (`--auth FILE`).
        self.extra = list(extra or [])
        #: The self-signed certificate QUIC clients trust.
        self.cert = str(data_dir / "cert.pem")
        self.process: Optional[subprocess.Popen[str]] = None
        self.start()

    def start(self) -> None:
        """Starts it (again, on the same port and data directory)."""
        self.process = subprocess.Popen(
            [
                self.binary, "serve",
                "--ws", f"127.0.0.1:{self.port}",
                "--quic", "127.0.0.1:0" if self.quic else "off",
                "--data-dir", str(self.data_dir),
                *self.extra,
            ],
            stderr=subprocess.PIPE,
            text=True,
        )
        assert self.process.stderr is not None
        log: List[str] = []
        for line in self.process.stderr:
            log.append(line)
            if "quic://" in line:
                self.quic_url = line[line.index("quic://"):].split()[0]
            elif "ws://" in line or "wss://" in line:
                at = line.index("wss://") if "wss://" in line else line.index("ws://")
                self.url = line[at:].split()[0]
                self.port = int(self.url.rsplit(":", 1)[1].split("/")[0])
                break
        else:
            raise RuntimeError("the server exited before listening:\n" + "".join(log))
        # Keep draining its log so that it never blocks on a full pipe.
        threading.Thread(target=self.process.stderr.read, daemon=True).start()

    def kill(self) -> None:
        """SIGKILL: no goodbye to its clients."""
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()

    def stop(self) -> None:
        """SIGTERM, and wait for it."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            self.process.wait(timeout=10)


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """One server for the tests that do not stop it (each uses keys of its own)."""
    running = Server(tmp_path_factory.mktemp("data"), quic=True)
    yield running
    running.stop()


@pytest.fixture
def own_server(tmp_path: Path) -> Iterator[Server]:
    """A server of the test's own, which it may kill and restart."""
    running = Server(tmp_path / "data")
    yield running
    running.stop()


AUTH_POLICY = """
[[principal]]
name = "workers"
secret = "workers-secret"
locks = ["jobs/"]
read = [""]
"""


@pytest.fixture
def auth_server(tmp_path: Path) -> Iterator[Server]:
    """A server started with --auth: principal `workers` may lock `jobs/`."""
    policy = tmp_path / "auth.toml"
    policy.write_text(AUTH_POLICY)
    running = Server(tmp_path / "data", extra=["--auth", str(policy)])
    yield running
    running.stop()
