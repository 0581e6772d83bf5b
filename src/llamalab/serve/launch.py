"""Start `llamalab serve` in a child process on a free loopback port (tests and benchmarks).

The server runs exactly as a user starts it, in its own interpreter, so what is tested
is the command, not an in-process imitation.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Self

from llamalab.errors import LlamalabError


def free_port() -> int:
    """A TCP port that was free a moment ago (the server binds it right after)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServerProcess:
    """``with ServerProcess(["--max-batch", "8"]) as server: server.url ...``"""

    def __init__(self, args: Sequence[str] = (), *, startup_timeout: float = 300.0) -> None:
        self.args = list(args)
        self.startup_timeout = startup_timeout
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        # The server's output goes to a file (a pipe nobody reads would fill and block it);
        # the handle lives as long as the server, so no `with` block fits.
        self._log = tempfile.NamedTemporaryFile(  # noqa: SIM115
            prefix="llamalab-serve-", suffix=".log", delete=False
        )

    def start(self) -> ServerProcess:
        """Launch the server and wait until it answers."""
        return self.launch().wait_ready()

    def launch(self) -> ServerProcess:
        """Launch the server without waiting (load something else meanwhile, then `wait_ready`)."""
        env = dict(os.environ)  # the server runs as a user's would: no settings of ours
        command = [
            sys.executable,
            "-m",
            "llamalab",
            "serve",
            "--port",
            str(self.port),
            "--log-level",
            "warning",
            *self.args,
        ]
        self.proc = subprocess.Popen(command, stdout=self._log, stderr=subprocess.STDOUT, env=env)
        self._launched = time.monotonic()
        return self

    def wait_ready(self) -> ServerProcess:
        assert self.proc is not None, "launch() first"
        deadline = self._launched + self.startup_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise LlamalabError(
                    f"the server exited with {self.proc.returncode}:\n{self.log_text()}"
                )
            try:
                self.health()
                return self
            except (OSError, urllib.error.URLError):
                time.sleep(0.2)
        self.stop()
        raise LlamalabError(
            f"the server did not answer within {self.startup_timeout:.0f} s:\n{self.log_text()}"
        )

    def health(self) -> dict:
        with urllib.request.urlopen(self.url + "/health", timeout=5) as response:
            return json.loads(response.read())

    def log_text(self) -> str:
        return Path(self._log.name).read_text(errors="replace")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                # SIGTERM drains first: running requests get --shutdown-grace seconds.
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
        Path(self._log.name).unlink(missing_ok=True)
