"""A missing or broken tenant source never reroutes a tenant: the worker stops consuming, keeps last-good configs,
quarantines bad files, and says so — observed on the broker, through the CLI and on /readyz."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from contracts import InferenceReply, Status, Topology
from tests import samples
from tests.broker import BrokerClient, collect, drain_now
from tests.conftest import start_worker, worker_settings, write_tenant
from tests.fakes.openai_server import FakeOpenAI
from tests.ops.scrape import free_port, get_json, scrape
from tests.scene import Scene, tenants_reloaded, until
from worker.tenants import NO_TENANTS_MARKER

pytestmark = pytest.mark.broker


def run_cli(*argv: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "worker", *argv],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, **(env or {})},
    )


def test_run_with_a_wrong_tenants_directory_refuses_to_start_in_one_line(tmp_path: Path, amqp_url: str) -> None:
    missing = tmp_path / "tenats"  # a typo

    done = run_cli("run", "--tenants", str(missing), "--namespace", "test-never-declared", env={"AMQP_URL": amqp_url})

    assert done.returncode == 6
    [line] = done.stderr.strip().splitlines()
    assert str(missing) in line
    assert "does not exist" in line
    assert "Traceback" not in done.stderr


def test_run_with_an_empty_tenants_directory_refuses_and_names_the_marker(tmp_path: Path, amqp_url: str) -> None:
    done = run_cli("run", "--tenants", str(tmp_path), "--namespace", "test-never-declared", env={"AMQP_URL": amqp_url})

    assert done.returncode == 6
    assert NO_TENANTS_MARKER in done.stderr


async def test_directory_removed_mid_run_pauses_consumption_and_nothing_reaches_atlas_cloud(
    amqp_url: str, topology: Topology, client: BrokerClient, fake_openai: FakeOpenAI, tmp_path: Path
) -> None:
    directory = tmp_path / "tenants"
    directory.mkdir()
    write_tenant(directory, "acme", fake_openai.base_url, policy="fail_closed")
    port = free_port()
    settings = worker_settings(amqp_url, topology, directory, metrics_port=port)
    running = await start_worker(settings)
    try:
        cloud = await client.bind_observer(settings.atlas_cloud_exchange)
        replies = await client.reply_queue()
        parked = tmp_path / "parked"
        directory.rename(parked)  # unmounted
        await until(lambda: not running.app.registry.healthy and not running.app.consumer.consuming)  # type: ignore[union-attr]
        status, body = await get_json(port, "/readyz")
        assert status == 503
        assert body["checks"]["tenant_source_healthy"] is False

        # Requests for the configured fail_closed tenant and for one the worker has never seen arrive meanwhile.
        bodies = [samples.request("acme", "summary") for _ in range(5)] + [samples.request("initech", "summary")]
        for body in bodies:
            await client.publish_request(body, reply_to=replies.name)

        parked.rename(directory)  # back
        answered = await collect(replies, 5)
        rerouted = await collect(cloud, 1)  # initech truly has no config: rerouted only once the source is healthy

        assert {InferenceReply.model_validate_json(m.body).status for m in answered} == {Status.OK}
        assert [m.headers.get("atlas-tenant-id") for m in rerouted] == ["initech"]
        assert await drain_now(cloud) == []
        samples_now = await scrape(port)
        assert samples_now.value("atlas_worker_tenant_source_faults_total") >= 1
        assert samples_now.value("atlas_worker_tenant_source_healthy") == 1
    finally:
        await running.stop()


async def test_a_non_utf8_file_quarantines_its_tenant_and_later_edits_still_load(scene: Scene) -> None:
    async with tenants_reloaded(scene.app):
        path = write_tenant(scene.tenants_dir, "acme", scene.fake.base_url, policy="atlas_cloud")
        path.write_bytes(path.read_bytes().replace(b"fake-model", b"fake-mod\xe8le"))
    assert scene.app.registry.problems("acme") is not None

    await scene.send(samples.request("acme", "summary"))

    left = await scene.leftovers()
    [message] = left.replies
    reply = InferenceReply.model_validate_json(message.body)
    assert reply.status is Status.FAILED
    assert reply.error is not None
    assert reply.error.code == "tenant_config_invalid"
    assert "UTF-8" in reply.error.message
    assert left.cloud == []

    # The watcher is alive: a new tenant and the fixed file load.
    async with tenants_reloaded(scene.app):
        write_tenant(scene.tenants_dir, "globex", scene.fake.base_url)
        write_tenant(scene.tenants_dir, "acme", scene.fake.base_url)
    assert scene.app.registry.get("globex") is not None
    assert scene.app.registry.get("acme") is not None
    assert scene.app.tenants_watched


async def test_a_misspelled_key_quarantines_the_tenant_and_validate_names_the_fix(scene: Scene) -> None:
    async with tenants_reloaded(scene.app):
        path = write_tenant(scene.tenants_dir, "acme", scene.fake.base_url, policy="queue_and_retry")
        path.write_text(path.read_text().replace("[fallback]", "[fallbak]"))
    assert scene.app.registry.problems("acme") is not None

    done = run_cli("tenants", "validate", str(path))
    assert done.returncode == 1
    assert "fallbak: unknown key; did you mean 'fallback'?" in done.stdout

    await scene.send(samples.request("acme", "summary"))
    [message] = (await scene.leftovers()).replies
    assert InferenceReply.model_validate_json(message.body).error.code == "tenant_config_invalid"  # type: ignore[union-attr]


async def test_a_tenant_id_differing_only_in_case_is_rejected_not_rerouted(scene: Scene) -> None:
    await scene.tenant("acme")

    await scene.send(samples.request("ACME", "summary"))

    left = await scene.leftovers()
    [message] = left.replies
    reply = InferenceReply.model_validate_json(message.body)
    assert reply.status is Status.REJECTED
    assert reply.error is not None
    assert reply.error.code == "tenant_id_case_mismatch"
    assert "'acme'" in reply.error.message
    assert left.cloud == []
    assert scene.fake.requests == []


def test_tenants_validate_reports_references_without_values_and_speaks_json(tmp_path: Path) -> None:
    path = write_tenant(tmp_path, "acme", "http://127.0.0.1:9/v1", api_key="env:ACME_SET_KEY")
    write_tenant(tmp_path, "globex", "http://127.0.0.1:9/v1", api_key="env:GLOBEX_UNSET_KEY")
    write_tenant(tmp_path, "initech", "http://127.0.0.1:9/v1", api_key="env:INITECH_BLANK_KEY")
    env = {"ACME_SET_KEY": "sk-secret-value-123", "INITECH_BLANK_KEY": " \n"}

    done = run_cli("tenants", "validate", str(tmp_path), "--json", env=env)

    assert done.returncode == 0
    assert "sk-secret-value-123" not in done.stdout
    report = json.loads(done.stdout)
    by_tenant = {f["tenant_id"]: f for f in report["files"]}
    assert by_tenant["acme"]["references"]["provider.api_key"] == "env:ACME_SET_KEY: set"
    assert "NOT SET" in by_tenant["globex"]["references"]["provider.api_key"]
    assert "EMPTY" in by_tenant["initech"]["references"]["provider.api_key"]
    assert report["valid"] == 3
    assert str(path) in {f["file"] for f in report["files"]}


def test_test_connection_config_refuses_the_literal_key_that_validate_refuses(tmp_path: Path) -> None:
    path = write_tenant(tmp_path, "draft", "http://127.0.0.1:9/v1", api_key="sk-live-literal-key")

    validated = run_cli("tenants", "validate", str(path))
    tested = run_cli("test-connection", "--config", str(path))

    assert validated.returncode == 1
    assert tested.returncode == 2
    for done in (validated, tested):
        assert "secrets must be references" in done.stdout + done.stderr
        assert "sk-live-literal-key" not in done.stdout + done.stderr


def test_an_empty_atlas_tenants_dir_is_refused_rather_than_read_as_the_working_directory(tmp_path: Path) -> None:
    (tmp_path / "pyproject.toml").write_text('[project]\nname = "x"\n')

    done = subprocess.run(
        [sys.executable, "-m", "worker", "tenants", "validate"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
        env={**os.environ, "ATLAS_TENANTS_DIR": ""},
    )

    assert done.returncode == 2, done.stderr
    assert "ATLAS_TENANTS_DIR is set but empty" in done.stderr


def test_tenants_validate_names_a_misnamed_tenant_file_and_a_directory_with_no_tenant(tmp_path: Path) -> None:
    misnamed, stray = tmp_path / "misnamed", tmp_path / "stray"
    misnamed.mkdir()
    stray.mkdir()
    write_tenant(misnamed, "globex", "http://127.0.0.1:9/v1")
    write_tenant(misnamed, "acme", "http://127.0.0.1:9/v1").rename(misnamed / "acme.toml.txt")
    (stray / "pyproject.toml").write_text('[project]\nname = "x"\n')

    first = run_cli("tenants", "validate", str(misnamed))
    second = run_cli("tenants", "validate", str(stray))

    assert first.returncode == 1
    assert "acme.toml.txt" in first.stdout + first.stderr
    assert "rename it to acme.toml" in first.stdout + first.stderr
    assert second.returncode == 1
    assert "is a valid tenant configuration" in second.stdout + second.stderr
