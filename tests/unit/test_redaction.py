"""The redaction facility: secrets masked by value, URL and shape, in text, message bodies and log lines."""

import asyncio
import logging
import random
import string
import time

import orjson
import pytest
import structlog
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import SecretStr

from tests.fakes.vertex_server import new_key, service_account_json
from worker.log import configure_logging
from worker.redaction import (
    AUTOMATON_FROM,
    MASK,
    KnownSecrets,
    draft_secrets,
    known_secrets,
    redact,
    redact_body,
    redact_cut_body,
    redact_provider_text,
    redact_text,
    redact_url,
    remember_url_credentials,
)
from worker.secrets import resolve_secret

SERVICE_ACCOUNT = service_account_json(new_key(), "http://127.0.0.1:9/token")
PRIVATE_KEY = orjson.loads(SERVICE_ACCOUNT)["private_key"]
# A line from the middle of the PEM: what must never be printed, whatever surrounds it.
KEY_MATERIAL = PRIVATE_KEY.splitlines()[5]


def test_a_resolved_secret_is_masked_wherever_it_is_quoted_raw_or_json_escaped() -> None:
    secrets = KnownSecrets()
    secrets.remember("zq8-opaque-tenant-value")  # no shape a pattern could know
    secrets.remember(SERVICE_ACCOUNT)

    assert secrets.scrub("401: key zq8-opaque-tenant-value refused") == f"401: key {MASK} refused"
    assert KEY_MATERIAL not in secrets.scrub(f"error body: {PRIVATE_KEY}")
    assert KEY_MATERIAL not in secrets.scrub(orjson.dumps({"quoted": PRIVATE_KEY}).decode())
    assert "0123456789abcdef" not in secrets.scrub("private_key_id 0123456789abcdef is disabled")


def test_short_values_are_not_masked_everywhere() -> None:
    secrets = KnownSecrets()
    secrets.remember("abc")
    assert secrets.scrub("abcdef") == "abcdef"


def test_the_oldest_secrets_are_forgotten_beyond_the_limit() -> None:
    secrets = KnownSecrets(limit=2)
    for value in ("first-secret-1", "second-secret-2", "third-secret-3"):
        secrets.remember(value)
    assert secrets.scrub("first-secret-1 third-secret-3") == f"first-secret-1 {MASK}"


async def test_a_drafts_secrets_are_masked_while_it_is_checked_then_forgotten() -> None:
    async def write(text: str) -> str:
        await asyncio.sleep(0)
        return redact_text(text)

    gate = asyncio.Event()

    async def another_delivery() -> str:  # started before the check, writing while it runs
        await gate.wait()
        return redact_text("other: draft-literal-key-42")

    other = asyncio.create_task(another_delivery())
    with draft_secrets():
        resolve_secret(SecretStr("draft-literal-key-42"))
        inside = [
            redact_text("here: draft-literal-key-42"),
            await asyncio.create_task(write("task: draft-literal-key-42")),
            await asyncio.to_thread(redact_text, "thread: draft-literal-key-42"),
        ]
        gate.set()
        elsewhere = await other

    assert inside == [f"here: {MASK}", f"task: {MASK}", f"thread: {MASK}"]
    assert elsewhere == "other: draft-literal-key-42"
    assert redact_text("after: draft-literal-key-42") == "after: draft-literal-key-42"
    assert known_secrets.scrub("draft-literal-key-42") == "draft-literal-key-42"


async def test_a_draft_cannot_fill_the_scope_it_is_checked_in() -> None:
    with draft_secrets():
        for n in range(1000):
            resolve_secret(SecretStr(f"flooded-value-{n:04}"))
        assert redact_text("flooded-value-0000 flooded-value-0999") == f"flooded-value-0000 {MASK}"


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("http://svc:pa55word@127.0.0.1:8000/v1", "http://***@127.0.0.1:8000/v1"),
        ("https://tokenonly@host/v1", "https://***@host/v1"),
        ("https://x.openai.azure.com/?api-key=deadbeef42&api-version=2024-10-21", None),
        ("https://host/v1?key=AIzaSyExample&alt=json", "https://host/v1?key=***&alt=json"),
        ("https://b.s3.amazonaws.com/o?X-Amz-Signature=abc123&X-Amz-Credential=AKIA", None),
        ("http://127.0.0.1:11434", "http://127.0.0.1:11434"),
        # The userinfo ends at the authority's last '@', as urllib and yarl split it: a password may hold '@'.
        ("amqp://guest:s3cr@tXYZ@broker:5672/", "amqp://***@broker:5672/"),
        ("amqp://ops@prod:pa@ss@w0rd@broker/vhost", "amqp://***@broker/vhost"),
        ("amqp://guest:s3cr@tXYZ@broker", "amqp://***@broker"),
        ("https://svc:s3cr@tXYZ@host/v1/@me?x=1", "https://***@host/v1/@me?x=1"),
        ("https://host/v1/users/@me", "https://host/v1/users/@me"),
        ("https://host?from=a@b", "https://host?from=a@b"),
    ],
)
def test_urls_lose_userinfo_and_credential_query_parameters(url: str, shown: str | None) -> None:
    printed = redact_url(url)
    if shown is not None:
        assert printed == shown
    for secret in ("pa55word", "tokenonly", "deadbeef42", "AIzaSyExample", "abc123", "=AKIA", "s3cr", "tXYZ", "w0rd"):
        assert secret not in printed
    assert "api-version=2024-10-21" in redact_url("https://h/?api-version=2024-10-21&api-key=k")


# What a password may hold inside a URL's authority without percent-encoding ('@' and ':' included).
PASSWORD_CHARS = st.characters(codec="ascii", exclude_characters="/?# \t\n\r\x0b\x0c", exclude_categories=["Cc"])


@settings(max_examples=500, deadline=None)
@given(st.text(PASSWORD_CHARS, min_size=1, max_size=40))
def test_no_part_of_a_password_is_left_in_a_printed_url(password: str) -> None:
    assert redact_url(f"amqp://atlas:{password}@broker:5672/prod") == "amqp://***@broker:5672/prod"


def test_a_password_with_quotes_is_masked_whole_in_a_url_quoted_inside_an_error() -> None:
    text = "error: cannot reach the broker at amqp://guest:S3cr'etPa\"55@127.0.0.1:5673/ ('timed out')"

    assert redact_text(text) == "error: cannot reach the broker at amqp://***@127.0.0.1:5673/ ('timed out')"


def test_a_url_password_made_known_is_masked_where_no_url_is_left_around_it() -> None:
    remember_url_credentials("http://svc-llm:Zq8v%2Fpw-71c@llm.internal/v1")

    # A scheme typo, a URL cut short, an error quoting the password alone: masked by value, decoded or not.
    text = "base_url http//svc-llm:Zq8v/pw-71c@llm.internal/v1, tried Zq8v%2Fpw-71c"
    assert redact_text(text) == f"base_url http//svc-llm:{MASK}@llm.internal/v1, tried {MASK}"


def test_each_url_in_a_text_loses_its_own_userinfo_and_nothing_between_them() -> None:
    text = "cannot reach amqp://guest:s3cr@tXYZ@broker:5672/ (mail ops@example.test) or amqp://u:p@w@h2/"

    assert redact_text(text) == "cannot reach amqp://***@broker:5672/ (mail ops@example.test) or amqp://***@h2/"


@pytest.mark.parametrize(
    "text",
    [
        f"bad key file: {PRIVATE_KEY}",
        orjson.dumps({"service_account": {"private_key": PRIVATE_KEY}}).decode(),
        f"truncated at 300 characters: {PRIVATE_KEY[:300]}",
    ],
)
def test_pem_blocks_are_masked_whole_even_when_cut_off(text: str) -> None:
    masked = redact_text(text)
    assert KEY_MATERIAL not in masked
    assert PRIVATE_KEY.splitlines()[1] not in masked


@pytest.mark.parametrize(
    "token",
    [
        "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",  # AWS secret access key shape
        "AIzaSyD4e5F6g7H8i9J0kLmNoPqRsTuVwXyZ012",  # Google API key shape
        "3f9c2b7a1e8d4c6b9a0f1e2d3c4b5a69",  # Azure key shape: 32 hex characters
    ],
)
def test_long_key_like_tokens_in_provider_error_text_are_masked(token: str) -> None:
    assert token not in redact_provider_text(f"401 Unauthorized: invalid credential {token} for this resource")


@pytest.mark.parametrize(
    "prose",
    [
        "the token endpoint failed; try again",
        "Vertex AI (gemini-2.5-flash in acme-prod/europe-west4): model not found",
        "Bedrock (anthropic.claude-3-5-sonnet-20240620-v1:0 in eu-central-1): throttled",
        "request 123e4567-e89b-12d3-a456-426614174000 rejected: basic auth is not enabled",
    ],
)
def test_provider_messages_without_secrets_read_as_they_were(prose: str) -> None:
    assert redact_provider_text(prose) == prose


def test_a_drafts_literal_secrets_are_masked_in_its_body_and_the_incident_is_kept() -> None:
    body = orjson.dumps(
        {
            "request_id": "tc-1",
            "tenant_id": "newco",
            "task": "test_connection",
            "provider": {"kind": "vertex", "service_account": SERVICE_ACCOUNT, "base_url": "http://u:p@h/"},
            "incident": {"title": "db password=hunter2 in logs", "logs": [{"message": PRIVATE_KEY}]},
        }
    )

    masked = redact_body(body)

    assert masked is not None
    shown = orjson.loads(masked)
    assert shown["provider"]["service_account"] == MASK
    assert shown["provider"]["base_url"] == "http://***@h/"
    assert shown["incident"]["title"] == "db password=hunter2 in logs"  # the request is replayed as it was sent
    assert KEY_MATERIAL not in masked.decode()


def test_bodies_without_secrets_are_left_alone_and_bodies_that_are_not_json_are_masked_as_text() -> None:
    assert redact_body(orjson.dumps({"request_id": "r", "incident": {"title": "ok"}})) is None
    masked = redact_body(b'{"provider": {"api_key": "lit' + PRIVATE_KEY.encode() + b"\xff")
    assert masked is not None
    assert KEY_MATERIAL.encode() not in masked
    assert masked.endswith(b"\xff")  # bytes that are not text are kept as they were


def test_log_lines_carry_no_secret_whoever_wrote_them(
    capsys: pytest.CaptureFixture[str], restore_logging: None
) -> None:
    configure_logging("info", cache=False)  # the worker's own pipeline, writing to the captured stderr
    known_secrets.remember("opaque-tenant-key-77")
    log = structlog.get_logger("test")

    log.warning("circuit_open", endpoint="http://svc:pa55word@127.0.0.1:1/v1?api-key=qk-123456")
    log.info("provider_failed", api_key="plain", message="refused opaque-tenant-key-77")
    try:
        raise ValueError(f"cannot load key {PRIVATE_KEY}")
    except ValueError:
        log.exception("handler_crashed")
    logging.getLogger("aiohttp.client").error("lib says opaque-tenant-key-77")

    out = capsys.readouterr().err
    assert out.count("\n") == 4
    for secret in ("pa55word", "qk-123456", '"plain"', "opaque-tenant-key-77", KEY_MATERIAL):
        assert secret not in out
    assert "circuit_open" in out


@pytest.mark.parametrize("depth", [50, 600, 1000, 1023, 5000])
def test_a_body_nested_as_deep_as_a_publisher_likes_is_masked_without_running_out_of_stack(depth: int) -> None:
    # orjson parses up to 1,024 levels; Python's own stack gives out near 1,000 frames, and a walk that recurses
    # would fail the settle of the very dead letter this body belongs to, and put it back on the queue for ever.
    deep = b'{"k":' * depth + orjson.dumps(PRIVATE_KEY) + b"}" * depth
    body = b'{"request_id": "r", "incident": ' + deep + b"}"

    masked = redact_body(body)

    assert masked is not None
    assert KEY_MATERIAL.encode() not in masked
    assert redact_body(body.replace(orjson.dumps(PRIVATE_KEY), b'"leaf"')) is None


def test_a_log_event_nested_deeper_than_the_stack_is_masked() -> None:
    value: object = {"api_key": "literal-key-value-1234"}
    for _ in range(3000):
        value = {"k": [value]}

    masked = redact(value)

    for _ in range(3000):
        masked = masked["k"][0]
    assert masked == {"api_key": MASK}


def test_a_cut_body_is_masked_as_text_with_every_rule_and_its_bytes_kept() -> None:
    prefix = (
        b'{"provider": {"kind": "bedrock", "secret_access_key": "wJalr\\"XUtn", "external_id": "ext-7", '
        b'"region": "eu-west-1"}, "note": "\xff\xfe", "api_key": "unfinish'
    )

    masked = redact_cut_body(prefix)

    assert masked == (
        b'{"provider": {"kind": "bedrock", "secret_access_key": "***", "external_id": "***", '
        b'"region": "eu-west-1"}, "note": "\xff\xfe", "api_key": "***'
    )
    assert redact_cut_body(b'{"request_id": "r", "padding": "xxxx') is None


# Each of these took seconds per 64 KiB when a rule was tried at every position of a long run (the URL userinfo
# rule: 30 s for a provider error of 64 KiB); linear, each takes milliseconds. The bound is far from both.
ADVERSARIAL_TEXTS = {
    "letters and digits": "x1Y" * 22_000,
    "a token's three parts": "eyJ" + "a" * 32_000 + "." + "b" * 32_000,
    "a key field left open": '{"api_key": "' + "x1Y" * 21_000,
    "schemes without hosts": "a://" * 16_000,
    "an open PEM header": "-----BEGIN " + "A" * 64_000,
    "quoted strings": '"passwordpassword' * 3_800,
    "a key field's name run on": '{"a":"' + "pass" * 16_000,
    "escaped quotes": '"\\' * 32_000,
    "query separators": "key" + ";" * 64_000,
}


@pytest.mark.parametrize("text", ADVERSARIAL_TEXTS.values(), ids=ADVERSARIAL_TEXTS.keys())
def test_masking_takes_time_in_proportion_to_the_text(text: str) -> None:
    started = time.process_time()
    redact_provider_text(text)
    redact_cut_body(text.encode())
    assert time.process_time() - started < 2.0


FILLER = [f"filler-value-{n:03}" for n in range(AUTOMATON_FROM)]  # enough values for the automaton


@settings(max_examples=1000, deadline=None)
@given(
    values=st.lists(st.text(alphabet="ab-", min_size=6, max_size=9), min_size=1, max_size=8, unique=True),
    text=st.text(alphabet="ab-x", max_size=40),
)
def test_many_known_secrets_are_masked_exactly_as_a_few_are(values: list[str], text: str) -> None:
    few, many = KnownSecrets(), KnownSecrets()
    for value in values:
        few.remember(value)
        many.remember(value)
    for value in FILLER:
        many.remember(value)

    assert many.scrub(text) == few.scrub(text)  # the automaton agrees with the expression: leftmost, longest


def test_a_text_ending_inside_a_longer_known_secret_still_has_the_shorter_one_masked() -> None:
    secrets = KnownSecrets()
    for value in ["baaaaaaa", "aaaaaa", *FILLER]:  # a secret inside another, as a key's id inside its JSON
        secrets.remember(value)

    assert secrets.scrub("baaaaaaa") == MASK
    assert secrets.scrub("baaaaaa") == f"b{MASK}"  # the text ends on the way to the longer one
    assert secrets.scrub("xbaaaaaaab") == f"x{MASK}b"


def test_thousands_of_known_secrets_cost_a_text_what_a_few_do() -> None:
    secrets = KnownSecrets()
    draw = random.Random(7)  # keys look random: no common prefix for `re` to skip ahead on
    values = ["".join(draw.choices(string.ascii_letters + string.digits + "-_", k=40)) for _ in range(5000)]
    for value in values:
        secrets.remember(value)
    text = " ".join(["ordinary words of a log line"] * 200) + f" quoting {values[1234]}"

    assert secrets.scrub(text).endswith(f"quoting {MASK}")
    started = time.process_time()
    for _ in range(20):
        secrets.scrub(text)
    # An alternation of 5,000 keys in `re` takes about 76 ms per scrub of these 6 KB; the automaton 0.4 ms.
    assert time.process_time() - started < 0.5
