"""The quick look that lets most strings skip the masking rules gives exactly what the full rules give."""

from hypothesis import given, settings
from hypothesis import strategies as st

from worker.redaction import _redact_text_fully, known_secrets, redact, redact_log_event, redact_text

KNOWN = ("zq8-opaque-tenant-value", "Q7vLr2pX9sTm4Kd1")
for value in KNOWN:
    known_secrets.remember(value)

FRAGMENTS = (
    *KNOWN,
    "sk-proj-abcdef123456",
    "pk-LIVE_0123456789",
    "rk-",
    "AKIAABCDEFGHIJKLMNOP",
    "ASIA0123456789ABCDEF",
    "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.c2lnbmF0dXJlLXZhbHVl",
    "Bearer abc.def-123456",
    "basic dXNlcjpwYXNzd29yZA==",
    "token ",
    "the token endpoint",
    "https://user:hunter22@example.test/v1",
    "amqp://guest:guest@127.0.0.1:5672/",
    "?api-key=abc123",
    "&sig=ZZZ",
    ";X-Amz-Credential=AKIDEXAMPLE/20261202",
    "&key=",
    "password=hunter22",
    '"secret": "s3cr3t"',
    "client_secret:abc",
    "-----BEGIN PRIVATE KEY-----\nMIIEvQIBADANBg\n-----END PRIVATE KEY-----",
    "-----BEGIN RSA PRIVATE KEY-----\nMIIEow",
    "-----END CERTIFICATE-----",
    "ſecret=x1",  # folds to "secret" under IGNORECASE
    "\u212aey=abc",  # Kelvin sign: folds to "k"
    "TOKEN=abc",
    "req-0123456789abcdef",
    "2026-12-02T01:40:16.123456+00:00",
    "summarize_incident",
    "0123456789abcdef0123456789abcdef",
)
PIECES = st.one_of(st.sampled_from(FRAGMENTS), st.text(max_size=12), st.sampled_from(" =:&?;@/\"'\n-_.*"))
TEXTS = st.lists(PIECES, max_size=8).map("".join)


@settings(max_examples=1500, deadline=None)
@given(TEXTS)
def test_the_quick_look_masks_exactly_as_the_full_rules(text: str) -> None:
    assert redact_text(text) == _redact_text_fully(text)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(("event", "api_key", "error", "n", "nested", "password", "")), TEXTS))
def test_a_log_event_is_masked_as_redact_masks_it(fields: dict[str, str]) -> None:
    event = {**fields, "count": 3, "ratio": 0.5, "flag": True, "none": None, "nested": {"token": fields.get("n", "")}}
    assert redact_log_event(None, "info", dict(event)) == redact(event)
