"""Runs `atlas-worker` as an operator would, in a subprocess, and captures what it prints."""

import asyncio
import sys
from dataclasses import dataclass


@dataclass(frozen=True)
class CliResult:
    code: int
    stdout: str
    stderr: str

    @property
    def output(self) -> str:
        return self.stdout + self.stderr


async def atlas_worker(*args: str, amqp_url: str | None = None, stdin: str = "") -> CliResult:
    broker = ("--amqp-url", amqp_url) if amqp_url else ()
    # Broker flags belong to the subcommand, so they go last.
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "worker",
        *args,
        *broker,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(stdin.encode()), 60)
    assert process.returncode is not None
    return CliResult(process.returncode, out.decode(), err.decode())
