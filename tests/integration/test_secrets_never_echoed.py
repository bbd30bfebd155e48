"""No secret is ever echoed: replies, headers, dead letters, `dlq show/list`, log lines and Test Connection reports."""

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from contracts import Header, InferenceReply, Status, Topology
from tests import samples
from tests.broker import BrokerClient, collect
from tests.conftest import RunningWorker, running_worker, worker_settings, write_tenant
from tests.fakes.fixtures import VertexFake, fake_vertex  # noqa: F401
from tests.fakes.openai_server import FakeOpenAI, Fault
from tests.integration.test_operations_dlq import dlq, wait_for_dead_letters
from tests.scene import tenants_reloaded
from worker.log import configure_logging
from worker.providers.breaker import BreakerPolicy

pytestmark = pytest.mark.broker

WRONG_KEY = "zq8-opaque-wrong-value"  # a tenant's key with no shape any pattern knows: only its value gives it away
# A quote in it, as passwords may hold: text quoting the URL must not end the userinfo there.
URL_PASSWORD = "pa55'in-the-url"
URL_KEY = "qk-in-the-query-77"


async def ask(client: BrokerClient, body: dict[str, Any], reply_to: str | None = None) -> tuple[InferenceReply, bytes]:
    replies = await client.reply_queue()
    await client.publish_request(body, reply_to=reply_to or replies.name, correlation_id=body["request_id"])
    [message] = await collect(replies, 1, timeout_s=60)
    return InferenceReply.model_validate_json(message.body), message.body


async def dead_letters(client: BrokerClient) -> list[tuple[dict[str, Any], bytes]]:
    """Every dead letter's headers and body, left on the queue (the channel closes unacked)."""
    channel = await client.connection.channel()
    try:
        queue = await channel.declare_queue(client.topology.dead, passive=True)
        found = []
        while (message := await queue.get(no_ack=False, fail=False)) is not None:
            found.append((dict(message.headers or {}), message.body))
        return found
    finally:
        await channel.close()


async def test_a_401_body_quoting_the_key_reaches_no_reply_header_or_dlq_output(
    amqp_url: str,
    client: BrokerClient,
    worker: RunningWorker,
    fake_openai: FakeOpenAI,
    tenants_dir: Path,
    topology: Topology,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    fake_openai.quote_refused_key = True
    monkeypatch.setenv("ATLAS_TEST_WRONG_KEY", WRONG_KEY)
    async with tenants_reloaded(worker.app):
        write_tenant(
            tenants_dir, "acme", fake_openai.base_url, policy="queue_and_retry", api_key="env:ATLAS_TEST_WRONG_KEY"
        )

    reply, raw = await ask(client, samples.request("acme", "summary"))

    assert reply.status is Status.FAILED
    assert reply.error is not None
    assert reply.error.code == "unauthorized"
    assert "Incorrect API key provided: ***" in reply.error.message
    assert WRONG_KEY.encode() not in raw
    await wait_for_dead_letters(client, 1)
    [(headers, _body)] = await dead_letters(client)
    assert "401 from" in headers[Header.ERROR_MESSAGE]
    assert WRONG_KEY not in json.dumps(headers, default=str)
    listed = await dlq(amqp_url, topology, "list", "--json")
    shown = await dlq(amqp_url, topology, "show", json.loads(listed.stdout)[0]["id"])
    assert shown.code == 0, shown.stderr
    assert "Incorrect API key provided: ***" in shown.stdout
    assert WRONG_KEY not in shown.output + listed.output


@pytest.fixture
async def breaking_worker(amqp_url: str, topology: Topology, tenants_dir: Path) -> AsyncIterator[RunningWorker]:
    settings = worker_settings(amqp_url, topology, tenants_dir, breaker=BreakerPolicy(min_calls=1, cooldown_s=60))
    async with running_worker(settings) as running:
        yield running


async def test_credentials_in_endpoint_urls_reach_no_reply_log_line_or_report(
    client: BrokerClient,
    breaking_worker: RunningWorker,
    fake_openai: FakeOpenAI,
    tenants_dir: Path,
    capsys: pytest.CaptureFixture[str],
    restore_logging: None,
) -> None:
    configure_logging("info", cache=False)  # the worker's own JSON lines, written to the captured stderr
    fake_openai.api_key = None  # the URL's own credentials are the only ones: no bearer key beside them
    with_password = fake_openai.base_url.replace("://", f"://svc:{URL_PASSWORD}@")
    async with tenants_reloaded(breaking_worker.app):
        write_tenant(tenants_dir, "pw", with_password, api_key=None)
        write_tenant(tenants_dir, "qk", f"{fake_openai.base_url}?api-key={URL_KEY}", api_key=None)
    fake_openai.always = Fault("server_error")

    first, first_raw = await ask(client, samples.request("pw", "summary"))  # 503: the breaker opens
    second, second_raw = await ask(client, samples.request("pw", "summary"))  # refused by the open circuit
    keyed, keyed_raw = await ask(client, samples.request("qk", "summary"))
    fake_openai.always = None
    tested, tested_raw = await ask(client, {"request_id": "tc-qk", "tenant_id": "qk", "task": "test_connection"})

    assert second.error is not None
    assert second.error.code == "circuit_open"
    assert f"circuit open for {fake_openai.base_url.replace('://', '://***@')}" in second.error.message
    assert {first.status, second.status, keyed.status} == {Status.UNAVAILABLE}
    assert tested.result is not None
    assert tested.result.connection is not None
    assert tested.result.connection.endpoint == f"{fake_openai.base_url}?api-key=***"
    logs = capsys.readouterr().err
    assert '"event":"circuit_open"' in logs
    for raw in (first_raw, second_raw, keyed_raw, tested_raw, logs.encode()):
        assert URL_PASSWORD.encode() not in raw
        assert URL_KEY.encode() not in raw


async def test_a_password_in_the_url_beside_an_api_key_is_a_config_error_that_names_the_conflict(
    client: BrokerClient, worker: RunningWorker, fake_openai: FakeOpenAI, tenants_dir: Path
) -> None:
    with_password = fake_openai.base_url.replace("://", f"://svc:{URL_PASSWORD}@")
    async with tenants_reloaded(worker.app):
        write_tenant(tenants_dir, "both", with_password, api_key="env:TEST_FAKE_OPENAI_KEY")

    reply, raw = await ask(client, samples.request("both", "summary"))

    assert reply.error is not None
    assert reply.error.code == "config_invalid"
    assert "credentials in its URL and an api_key is set too" in reply.error.message
    assert URL_PASSWORD.encode() not in raw
    assert fake_openai.requests == []


def vertex_draft(vertex: VertexFake, **changes: Any) -> dict[str, Any]:
    provider = {
        "kind": "vertex",
        "project": "acme-prod",
        "location": "europe-west4",
        "model": "gemini-2.5-flash",
        "service_account": vertex.service_account,
        "base_url": vertex.fake.base_url,
    }
    return {"request_id": "tc-pem", "tenant_id": "newco", "task": "test_connection", "provider": provider | changes}


@pytest.mark.parametrize("how", ["malformed", "reply_unroutable"])
async def test_a_drafts_private_key_is_masked_before_it_is_dead_lettered(
    how: str,
    amqp_url: str,
    client: BrokerClient,
    worker: RunningWorker,
    fake_vertex: VertexFake,  # noqa: F811  (the fixture imported above, requested by name)
    topology: Topology,
) -> None:
    key_material = orjson.loads(fake_vertex.service_account)["private_key"].splitlines()[5]
    if how == "malformed":  # refused at decoding: a rejected reply, and the body parked as it came
        body = vertex_draft(fake_vertex, location=42)
        reply, _ = await ask(client, body)
        assert reply.status is Status.REJECTED
    else:  # tested, but nobody is listening for the answer
        await client.publish_request(vertex_draft(fake_vertex), reply_to="nobody-listens-here")
    await wait_for_dead_letters(client, 1)

    [(headers, parked)] = await dead_letters(client)
    listed = await dlq(amqp_url, topology, "list", "--json")
    shown = await dlq(amqp_url, topology, "show", json.loads(listed.stdout)[0]["id"])

    assert headers[Header.REASON] == how
    assert headers[Header.REDACTED] is True
    assert orjson.loads(parked)["provider"]["service_account"] == "***"
    assert orjson.loads(parked)["provider"]["project"] == "acme-prod"  # what is not secret stays readable
    assert key_material.encode() not in parked
    assert shown.code == 0, shown.stderr
    assert f"{Header.REDACTED}: true" in shown.stdout
    for output in (shown.output, listed.output):
        assert key_material not in output
        assert "BEGIN PRIVATE KEY-----\\n" not in output
        assert "BEGIN PRIVATE KEY-----\n" not in output


async def test_stored_tenant_with_an_unset_variable_is_not_reported_reachable(
    client: BrokerClient,
    worker: RunningWorker,
    fake_openai: FakeOpenAI,
    tenants_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("ATLAS_TEST_UNSET_KEY", raising=False)
    async with tenants_reloaded(worker.app):
        write_tenant(tenants_dir, "acme", fake_openai.base_url, api_key="env:ATLAS_TEST_UNSET_KEY")

    reply, _ = await ask(client, {"request_id": "tc-acme", "tenant_id": "acme", "task": "test_connection"})

    assert reply.status is Status.OK
    assert reply.result is not None
    assert reply.result.connection is not None
    report = reply.result.connection
    assert (report.reachable, report.authenticated, report.verdict) == (False, None, "not_ready")
    assert [(c.requirement, c.status) for c in report.checks] == [("secrets", "fail")]
    assert "environment variable ATLAS_TEST_UNSET_KEY" in (report.checks[0].fix or "")
    assert fake_openai.requests == []


@pytest.fixture
async def draft_worker(amqp_url: str, topology: Topology, tenants_dir: Path) -> AsyncIterator[RunningWorker]:
    """A worker whose drafts may reach the loopback fakes (a range the operator allows, as a private one)."""
    settings = worker_settings(amqp_url, topology, tenants_dir, allow_draft_cidrs=("127.0.0.0/8",))
    async with running_worker(settings) as running:
        yield running


async def test_a_drafts_literal_key_is_masked_in_its_own_report_and_nowhere_else(
    client: BrokerClient,
    draft_worker: RunningWorker,
    fake_openai: FakeOpenAI,
    capsys: pytest.CaptureFixture[str],
    restore_logging: None,
) -> None:
    configure_logging("info", cache=False)  # the worker's own JSON lines, written to the captured stderr
    fake_openai.quote_refused_key = True
    # A publisher's "key" that is another tenant's id: were it made a known secret process-wide, the worker
    # would mask that tenant's id in every later log line and dead letter.
    draft = {"kind": "openai_compatible", "base_url": fake_openai.base_url, "model": "m", "api_key": "globex-prod"}

    tested, tested_raw = await ask(
        client, {"request_id": "tc-words", "tenant_id": "newco", "task": "test_connection", "provider": draft}
    )
    check_logs = capsys.readouterr().err
    later, _ = await ask(client, {"request_id": "later", "tenant_id": "globex-prod", "task": "no-such-task"})
    await wait_for_dead_letters(client, 1)
    [(headers, parked)] = await dead_letters(client)
    later_logs = capsys.readouterr().err

    assert tested.result is not None
    assert tested.result.connection is not None
    assert tested.result.connection.verdict == "not_ready"
    assert "Incorrect API key provided: ***" in tested_raw.decode()
    assert b"globex-prod" not in tested_raw
    assert '"request_id":"tc-words"' in check_logs
    assert "globex-prod" not in check_logs
    assert later.tenant_id == "globex-prod"
    assert orjson.loads(parked)["tenant_id"] == "globex-prod"  # the dead letter is the request as it came
    assert Header.REDACTED not in headers
    assert '"tenant_id":"globex-prod"' in later_logs
