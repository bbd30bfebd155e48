"""Runs `python -m worker run` as a child process, the way operators and orchestrators do."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from contracts import Topology

ROOT = Path(__file__).resolve().parent.parent


class WorkerProcess:
    def __init__(self, amqp_url: str, topology: Topology, tenants_dir: Path, log_path: Path, *extra: str) -> None:
        self.args = [
            sys.executable,
            "-m",
            "worker",
            "run",
            "--amqp-url",
            amqp_url,
            "--namespace",
            topology.namespace,
            "--tenants",
            str(tenants_dir),
            "--atlas-cloud-exchange",
            f"{topology.namespace}.atlas-cloud",
            "--retry-base",
            "0.2",
            "--retry-factor",
            "2",
            "--retry-levels",
            "4",
            "--breaker-min-calls",  # tests about the breaker pass their own
            "1000",
            *extra,
        ]
        self.log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self, timeout_s: float = 30) -> None:
        self.starts += 1
        offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(self.args, cwd=ROOT, env=os.environ.copy(), stderr=log, stdout=log)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"worker exited with {self.process.returncode}: {self.log()[-2000:]}")
            if b'"worker_started"' in self.log_path.read_bytes()[offset:]:
                return
            time.sleep(0.05)
        raise AssertionError(f"worker did not start: {self.log()[-2000:]}")

    def kill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(10)

    def terminate(self, timeout_s: float = 30) -> int:
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout_s)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
