"""What an operator sees at the edges of a worker's life: one line and a distinct exit code when it cannot
start, a second signal that stops it at once, and the command line's conventions."""

import asyncio
import json
import os
import pty
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from contracts import Topology
from tests import samples
from tests.broker import BrokerClient
from tests.conftest import write_tenant
from tests.fakes.openai_server import FakeOpenAI
from tests.integration.test_process_lifecycle import wait_until
from tests.ops.cli import CliResult, atlas_worker
from tests.process import ROOT, WorkerProcess
from worker.broker.topology import topology_spec
from worker.exit_codes import ExitCode
from worker.handling.ladder import RetryLadder
from worker.ops.commands import declared_summary


@pytest.fixture
def held_port() -> Iterator[int]:
    """A port some other program is listening on."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        yield holder.getsockname()[1]


def printed_lines(result: CliResult) -> list[str]:
    """What the command printed besides its JSON log events."""
    return [line for line in result.output.splitlines() if line.strip() and not line.startswith("{")]


def assert_one_line_error(result: CliResult, code: ExitCode, *fragments: str) -> None:
    assert result.code == code, result.output
    assert "Traceback" not in result.output
    [line] = printed_lines(result)
    assert line.startswith("error: ")
    for fragment in fragments:
        assert fragment in line


async def run_worker(tenants_dir: Path, *flags: str, amqp_url: str) -> CliResult:
    return await atlas_worker("run", "--tenants", str(tenants_dir), "--log-format", "json", *flags, amqp_url=amqp_url)


async def test_broker_unreachable_is_one_line_with_its_own_exit_code(tenants_dir: Path, closed_port: int) -> None:
    url = f"amqp://guest:guest@127.0.0.1:{closed_port}/"

    for result in (
        await run_worker(tenants_dir, amqp_url=url),
        await atlas_worker("dlq", "list", amqp_url=url),
        await atlas_worker("topology", "declare", amqp_url=url),
    ):
        assert_one_line_error(result, ExitCode.BROKER_UNREACHABLE, "cannot reach the broker", f":{closed_port}/")


@pytest.mark.broker
async def test_a_refused_password_is_one_line_that_does_not_echo_it(amqp_url: str, tenants_dir: Path) -> None:
    wrong = amqp_url.replace("guest:guest@", "guest:not-the-password-0b7f@")
    assert wrong != amqp_url

    result = await run_worker(tenants_dir, amqp_url=wrong)

    assert_one_line_error(result, ExitCode.BROKER_AUTH, "refused the credentials")
    assert "not-the-password-0b7f" not in result.output


@pytest.mark.parametrize("password", ["s3cr/tXYZ", "s3cr#tXYZ", "s3cr?tXYZ", "1234#tXYZ", "1234/tXYZ"])
async def test_a_password_with_a_reserved_character_is_one_line_that_does_not_echo_it(
    tenants_dir: Path, closed_port: int, password: str
) -> None:
    url = f"amqp://guest:{password}@127.0.0.1:{closed_port}/"

    for result in (
        await run_worker(tenants_dir, amqp_url=url),
        await atlas_worker("dlq", "list", amqp_url=url),
        await atlas_worker("topology", "declare", amqp_url=url),
    ):
        assert_one_line_error(result, ExitCode.USAGE, "percent-encode reserved characters in the password")
        assert "s3cr" not in result.output
        assert "tXYZ" not in result.output
        assert "1234" not in result.output


async def test_an_encoded_password_with_reserved_characters_reaches_the_broker(
    tenants_dir: Path, closed_port: int
) -> None:
    url = f"amqp://guest:s3cr%2Ft%23X%40YZ@127.0.0.1:{closed_port}/"

    result = await run_worker(tenants_dir, amqp_url=url)

    assert_one_line_error(result, ExitCode.BROKER_UNREACHABLE, "cannot reach the broker", "amqp://***@127.0.0.1")
    assert "s3cr" not in result.output


async def test_publisher_rules_without_a_known_worker_user_are_refused_at_start(tenants_dir: Path) -> None:
    url = "amqps://127.0.0.1:5671/?auth=external"  # the user is the client certificate's, unknown to the worker

    result = await run_worker(tenants_dir, "--publisher", "incident-api=acme", amqp_url=url)

    assert_one_line_error(result, ExitCode.USAGE, "--publisher", "AMQP_URL")


async def test_metrics_port_in_use_is_one_line_with_its_own_exit_code(
    tenants_dir: Path, held_port: int, closed_port: int
) -> None:
    flags = ("--metrics-host", "127.0.0.1", "--metrics-port", str(held_port))

    result = await run_worker(tenants_dir, *flags, amqp_url=f"amqp://guest:guest@127.0.0.1:{closed_port}/")

    assert_one_line_error(result, ExitCode.METRICS_PORT_IN_USE, f"127.0.0.1:{held_port}", "in use")


@pytest.mark.parametrize(
    ("flag", "value", "why"),
    [
        ("--prefetch", "many", "'many' is not a whole number"),
        # 0 would be AMQP's "no limit": every message in the queue delivered to this one worker.
        ("--prefetch", "0", "0 is not a positive number"),
        ("--retry-levels", "0", "0 is not a positive number"),
        ("--retry-base", "nan", "nan is not a finite number"),
        ("--retry-factor", "0.5", "0.5 is below 1"),
        ("--breaker-failure-rate", "2", "2 is not a share above 0 and at most 1"),
        ("--delivery-limit", "0", "0 is not a positive number"),
        ("--grace", "-5", "-5 is negative"),
        ("--metrics-port", "70000", "70000 is not a TCP port"),
    ],
)
async def test_invalid_flags_exit_2_without_a_traceback(flag: str, value: str, why: str) -> None:
    result = await atlas_worker("run", flag, value)

    assert result.code == 2  # argparse's own code, which ExitCode.USAGE names
    assert "Traceback" not in result.output
    assert f"argument {flag}: {why}" in result.stderr


async def test_flags_each_valid_but_not_together_exit_2_in_one_line(tenants_dir: Path, closed_port: int) -> None:
    result = await run_worker(
        tenants_dir, "--retry-levels", "31", amqp_url=f"amqp://guest:guest@127.0.0.1:{closed_port}/"
    )

    assert_one_line_error(result, ExitCode.USAGE, "1..30 levels")


@pytest.mark.parametrize(
    ("flags", "why"),
    [
        (("--header-key-previous", "env:OLD_KEY"), "--header-key-previous needs --header-key"),
        (("--header-key", "env:NEW_KEY", "--header-key-previous", "the-old-key"), "takes a reference"),
    ],
)
async def test_a_key_being_rotated_out_needs_a_key_to_sign_with_and_is_a_reference(
    tenants_dir: Path, closed_port: int, flags: tuple[str, ...], why: str
) -> None:
    result = await run_worker(tenants_dir, *flags, amqp_url=f"amqp://guest:guest@127.0.0.1:{closed_port}/")

    assert_one_line_error(result, ExitCode.USAGE, why)


async def test_a_namespace_declared_with_another_ladder_is_one_line_naming_the_flags(
    amqp_url: str, tenants_dir: Path, topology: Topology
) -> None:
    first = await atlas_worker("topology", "declare", "--namespace", topology.namespace, amqp_url=amqp_url)
    assert first.code == 0, first.output
    flags = ("--namespace", topology.namespace, "--retry-base", "2")  # queue arguments cannot change in place

    ran = await run_worker(tenants_dir, *flags, amqp_url=amqp_url)
    declared = await atlas_worker("topology", "declare", *flags, amqp_url=amqp_url)

    for result in (ran, declared):
        assert_one_line_error(result, ExitCode.TOPOLOGY_MISMATCH, "x-message-ttl", "--retry-base", "--namespace")


async def test_an_unknown_virtual_host_is_named_as_such_not_as_an_unreachable_broker(amqp_url: str) -> None:
    result = await atlas_worker("dlq", "list", amqp_url=amqp_url.rstrip("/") + "/no-such-vhost")

    assert_one_line_error(result, ExitCode.BROKER_AUTH, "refused the virtual host")


def test_the_exit_codes_are_distinct() -> None:
    assert len({int(code) for code in ExitCode}) == len(ExitCode)


async def test_version() -> None:
    result = await atlas_worker("--version")

    assert result.code == 0
    assert result.stdout.strip() == "atlas-worker 0.1.0"


@pytest.mark.parametrize("where", ["before", "after"])
async def test_global_options_go_before_or_after_the_subcommand(
    where: str, tenants_dir: Path, closed_port: int
) -> None:
    options = ("--log-level", "warning", "--log-format", "json")
    command = ("run", "--tenants", str(tenants_dir))
    args = (*options, *command) if where == "before" else (*command, *options)

    result = await atlas_worker(*args, amqp_url=f"amqp://guest:guest@127.0.0.1:{closed_port}/")

    assert result.code == ExitCode.BROKER_UNREACHABLE
    assert "tenants_loaded" not in result.stderr  # an info event, below --log-level warning


async def test_logs_are_json_off_a_terminal_and_console_on_request(tenants_dir: Path, closed_port: int) -> None:
    url = f"amqp://guest:guest@127.0.0.1:{closed_port}/"

    piped = await atlas_worker("run", "--tenants", str(tenants_dir), amqp_url=url)
    console = await atlas_worker("run", "--tenants", str(tenants_dir), "--log-format", "console", amqp_url=url)

    [event] = [json.loads(line) for line in piped.stderr.splitlines() if "tenants_loaded" in line]
    assert event["event"] == "tenants_loaded"
    [line] = [line for line in console.stderr.splitlines() if "tenants_loaded" in line]
    assert not line.startswith("{")


def test_logs_are_console_lines_on_a_terminal(tenants_dir: Path, closed_port: int) -> None:
    primary, secondary = pty.openpty()
    process = subprocess.Popen(
        [sys.executable, "-m", "worker", "run", "--tenants", str(tenants_dir)],
        cwd=ROOT,
        env=os.environ | {"AMQP_URL": f"amqp://guest:guest@127.0.0.1:{closed_port}/", "NO_COLOR": "1"},
        stdout=subprocess.DEVNULL,
        stderr=secondary,
    )
    os.close(secondary)
    assert process.wait(30) == ExitCode.BROKER_UNREACHABLE
    output = b""
    try:
        while chunk := os.read(primary, 65536):
            output += chunk
    except OSError:  # the terminal's other end is gone: everything has been read
        pass
    finally:
        os.close(primary)

    [line] = [line for line in output.decode().splitlines() if "tenants_loaded" in line]
    assert not line.startswith("{")


@pytest.mark.broker
async def test_a_second_sigterm_returns_in_flight_work_at_once_and_names_it(
    amqp_url: str,
    client: BrokerClient,
    fake_openai: FakeOpenAI,
    tenants_dir: Path,
    topology: Topology,
    tmp_path: Path,
) -> None:
    write_tenant(tenants_dir, "acme", fake_openai.base_url, timeout_s=120)
    fake_openai.latency_s = 120  # hangs far beyond the grace period
    process = WorkerProcess(amqp_url, topology, tenants_dir, tmp_path / "w.log", "--grace", "120")
    await asyncio.to_thread(process.start)
    ids = {f"hung-{n}" for n in range(3)}
    try:
        for request_id in sorted(ids):
            await client.publish_request(samples.request("acme", request_id=request_id))
        await wait_until(lambda: len(fake_openai.requests) == 3)
        assert process.process is not None
        process.process.send_signal(signal.SIGTERM)
        await wait_until(lambda: '"worker_draining"' in process.log())

        process.process.send_signal(signal.SIGTERM)
        exit_code = await asyncio.to_thread(process.process.wait, 15)  # not the 120 s grace
    finally:
        process.stop()

    assert exit_code == 0
    queue = await client.channel.declare_queue(topology.requests, passive=True)
    assert queue.declaration_result.message_count == 3
    [stopped] = [json.loads(line) for line in process.log().splitlines() if '"worker_stopped"' in line]
    assert stopped["forced"] is True
    assert stopped["returned_to_queue"] == 3
    assert set(stopped["returned_request_ids"]) == ids


def test_topology_declare_lists_each_entity_once_with_its_kind_under_matching_counts() -> None:
    spec = topology_spec(Topology("ns"), RetryLadder(base_s=1, factor=2, levels=3), delivery_limit=20)

    [head, *lines] = declared_summary(spec, "ns", "atlas.cloud").splitlines()

    exchanges = [line.split()[1] for line in lines if line.split()[0] == "exchange"]
    queues = [line.split()[1] for line in lines if line.split()[0] == "queue"]
    assert len(exchanges) + len(queues) == len(lines)
    assert head == f"declared for namespace 'ns': {len(exchanges)} exchanges, {len(queues)} queues, 6 bindings"
    assert sorted(exchanges) == sorted(["ns.requests", "ns.retry", "ns.replies", "ns.dead", "atlas.cloud"])
    assert len(set(queues)) == len(queues) == 6
