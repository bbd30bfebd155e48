"""The one redaction facility: masks secrets in every text that leaves the worker, by value, URL, shape and field.

    by value   every secret this process has resolved (a tenant's keys, the parts of a service-account JSON
               key), exact match, raw and JSON-escaped; a draft's literal keys only while it is checked
    by URL     userinfo (`user:pass@`) and credential-looking query parameters (`?api-key=`, `&sig=`)
    by shape   PEM blocks, bearer/basic tokens, `sk-…` keys, AWS access key ids, JWTs, `password=…` pairs; and,
               in provider error text only, long key-like tokens
    by field   whole strings under a secret-looking name (`api_key`, `password`, `service_account`, …)

Replies, failure headers, dead-letter bodies, log lines, Test Connection reports and operator commands all pass
through here; nothing else masks secrets.
"""

import functools
import re
import threading
from collections.abc import Callable, Iterator, Mapping, MutableMapping
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any
from urllib.parse import unquote, urlsplit

import ahocorasick
import orjson

MASK = "***"
# Shorter values are too likely to be ordinary words to be masked wherever they appear.
MIN_SECRET_CHARS = 6
# Enough for every secret of a few thousand tenants; the oldest are forgotten first (rotated keys).
KNOWN_SECRETS_LIMIT = 8192
# Parts of a service-account JSON key that are secret on their own.
JSON_KEY_PARTS = ("private_key", "private_key_id")

SECRET_FIELD = re.compile(
    r"pass(word|wd|phrase)?|secret|token|api[-_]?key|apikey|authorization|credential|private[-_]?key|"
    r"access[-_]?key|cookie|signature|service[-_]?account|external[-_]?id",
    re.IGNORECASE,
)
CREDENTIAL_QUERY_PARAMETER = re.compile(
    r"api[-_]?key|apikey|key|token|access[-_]?token|sig|signature|password|secret|client[-_]?secret|"
    r"x-amz-(signature|credential|security-token)",
    re.IGNORECASE,
)
PEM_BLOCK = re.compile(r"-----BEGIN ([A-Z0-9 ]{1,40})-----.*?(?:-----END \1-----|\Z)", re.DOTALL)
PEM_MASKED = rf"-----BEGIN \1-----{MASK}-----END \1-----"
# The userinfo runs to the authority's last '@' (the authority ends at '/', '?', '#' or a space), as urllib and yarl
# split it: a password may hold '@' or a quote unescaped, and stopping at the first would print it all or its tail.
# (Text quoting a URL and then an address, `"http://host","a@b"`, is masked too far: masking errs that way.)
# Tried only where a run of scheme characters starts: tried at every letter, a long run of them with no "://"
# would be scanned again from each one (quadratic: 30 s for 64 KiB of a provider's error text).
_URL_USERINFO = re.compile(r"(?<![a-z0-9+.-])([a-z0-9+.-]+://)[^/\s?#]+@", re.IGNORECASE)
# A parameter's name runs to the next separator, possessively: a name that may contain the separators would be
# scanned again from each one of a run of them (`key;;;;…`: minutes for 64 KiB).
_URL_QUERY_PARAMETER = re.compile(r"([?&;])([^=&;?#\s\"']++)=([^&#\s\"']*+)")
_SHAPES: tuple[tuple[re.Pattern[str], str], ...] = (
    (PEM_BLOCK, PEM_MASKED),
    # A credential after its scheme word; a digit or 16+ characters tell it from prose ("the token endpoint").
    (
        re.compile(
            r"\b(bearer|basic|token)(\s+)(?:(?=[A-Za-z0-9._~+/=-]*\d)[A-Za-z0-9._~+/=-]{6,}|[A-Za-z0-9._~+/=-]{16,})",
            re.IGNORECASE,
        ),
        rf"\1\2{MASK}",
    ),
    (re.compile(r"\b(sk|pk|rk)-[A-Za-z0-9_-]{6,}"), rf"\1-{MASK}"),
    (re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b"), rf"\1{MASK}"),
    (re.compile(r"\beyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}"), MASK),
    (
        re.compile(
            r"\b((?:api[-_]?key|password|passwd|secret|token|access[-_]?key|client[-_]?secret)[\"']?\s*[=:]\s*[\"']?)"
            r"[^\s\"',;&]+",
            re.IGNORECASE,
        ),
        rf"\1{MASK}",
    ),
)
# What lowercased ASCII text must contain for any URL or shape rule above to apply: the literal part every one of
# them needs (a credential parameter's name, a scheme word, a key prefix). Text without any is left as it is by
# all of them, so one search spares most strings (ids, enum values, timestamps) the whole list.
_SHAPE_NEEDLES = re.compile(r"-----begin|://|k-|akia|asia|eyj|key|passw|secret|token|sig|credential|bearer|basic")
# A key-like token: 32+ characters of a key alphabet, with digits and mixed case (base64 keys, Google API keys)
# or all hex (Azure keys, digests). Only for provider error text, where it is far more likely a key than prose.
_KEY_LIKE = re.compile(
    r"(?<![A-Za-z0-9+/=_-])(?:(?=[A-Za-z0-9+/=_-]*\d)(?=[A-Za-z0-9+/=_-]*[a-z])(?=[A-Za-z0-9+/=_-]*[A-Z])"
    r"[A-Za-z0-9+/=_-]{32,}|[0-9a-fA-F]{32,})(?![A-Za-z0-9+/=_-])"
)


class KnownSecrets:
    """Secret values this process has resolved, so any text can be scrubbed of them by exact match.

    Process-wide on purpose: a secret resolved for one call must be masked in every text that could quote it,
    including log lines written far from the tenant that owns it (a library's traceback, a broker error).
    A few values are matched with one regular expression; past `AUTOMATON_FROM` (a worker serving many tenants)
    with an Aho-Corasick automaton, whose time per character does not grow with the number of values. Both mask
    the leftmost match first, the longest one where several start there."""

    def __init__(self, limit: int = KNOWN_SECRETS_LIMIT) -> None:
        self._limit = limit
        self._values: dict[str, None] = {}  # insertion-ordered, so the oldest go first
        self._matcher: Callable[[str], str] | None = None
        self._lock = threading.Lock()  # secrets are also resolved in threads (token refreshes)

    def remember(self, value: str) -> None:
        forms = {form for part in _secret_parts(value) for form in _written_forms(part)}
        forms = {form for form in forms if len(form) >= MIN_SECRET_CHARS and form not in self._values}
        if not forms:
            return
        with self._lock:
            for form in forms:
                self._values[form] = None
            while len(self._values) > self._limit:
                del self._values[next(iter(self._values))]
            self._matcher = None

    def scrub(self, text: str) -> str:
        matcher = self._matcher
        if matcher is None:
            if not self._values:
                return text
            with self._lock:
                matcher = self._matcher = _literal_matcher(list(self._values))
        return matcher(text)


AUTOMATON_FROM = 64  # values; below this one regular expression is the faster of the two


def _literal_matcher(values: list[str]) -> Callable[[str], str]:
    """A function masking every occurrence of any of `values` in a text."""
    if len(values) < AUTOMATON_FROM:
        # Longest first, so a key is masked whole rather than around a shorter secret inside it.
        pattern = re.compile("|".join(map(re.escape, sorted(values, key=len, reverse=True))))
        return functools.partial(pattern.sub, MASK)
    automaton = ahocorasick.Automaton()
    for value in values:
        automaton.add_word(value, len(value))
    automaton.make_automaton()

    def masked(text: str) -> str:
        # Every match, then the leftmost and, of those starting there, the longest, as the expression picks them.
        # (pyahocorasick's own `iter_long` misses a shorter match when the text ends inside a longer value.)
        found = sorted((end + 1 - length, -length) for end, length in automaton.iter(text))
        if not found:
            return text
        parts: list[str] = []
        last = 0
        for start, negative_length in found:
            if start >= last:
                parts += (text[last:start], MASK)
                last = start - negative_length
        return "".join((*parts, text[last:]))

    return masked


known_secrets = KnownSecrets()
# A draft's own secrets (Test Connection from a message), masked only in what is written while it is checked.
_draft_secrets: ContextVar[KnownSecrets | None] = ContextVar("draft_secrets", default=None)
DRAFT_SECRETS_LIMIT = 64  # a draft names a handful; more would be a publisher's attempt to slow every scrub


def remember_secret(value: str) -> None:
    """Make a resolved secret known: process-wide, or inside `draft_secrets` only to the draft's own check."""
    (_draft_secrets.get() or known_secrets).remember(value)


def remember_url_credentials(url: str) -> None:
    """Make a URL's password known (as written and percent-decoded), so that it is masked by value wherever it
    appears, also where no URL shape is left around it: a URL cut short, a typo in its scheme, an error quoting it."""
    try:
        parts = urlsplit(url)
        password = parts.password
    except ValueError:  # a port that is no number: nothing can be said of its parts
        return
    if password:
        for form in {password, unquote(password)}:
            remember_secret(form)


@contextmanager
def draft_secrets() -> Iterator[None]:
    """Secrets resolved inside (and in the tasks and threads started from inside) are masked in every text
    written inside, and forgotten after. A draft comes from a message: were its literal values made known
    process-wide, any publisher could evict the tenants' real keys from the list, make the worker mask
    ordinary words in every log line and dead letter, and slow every scrub with thousands of values."""
    token = _draft_secrets.set(KnownSecrets(limit=DRAFT_SECRETS_LIMIT))
    try:
        yield
    finally:
        _draft_secrets.reset(token)


def _scrub_known(text: str) -> str:
    text = known_secrets.scrub(text)
    scoped = _draft_secrets.get()
    return text if scoped is None else scoped.scrub(text)


def _secret_parts(value: str) -> list[str]:
    parts = [value.strip()]
    if value.lstrip().startswith("{"):
        try:
            key = orjson.loads(value)
        except orjson.JSONDecodeError:
            return parts
        if isinstance(key, dict):
            parts += [str(key[name]).strip() for name in JSON_KEY_PARTS if key.get(name)]
    return parts


def _written_forms(value: str) -> set[str]:
    """The value as it appears raw and inside JSON text (a PEM key's newlines become `\\n` there)."""
    return {value, orjson.dumps(value).decode()[1:-1]}


def redact_url(url: str) -> str:
    """A URL safe to print: no userinfo, no value of a credential-looking query parameter."""
    return _URL_QUERY_PARAMETER.sub(_mask_credential_parameter, _URL_USERINFO.sub(rf"\1{MASK}@", url))


def _mask_credential_parameter(match: re.Match[str]) -> str:
    separator, name, value = match.groups()
    if CREDENTIAL_QUERY_PARAMETER.fullmatch(name) and value:
        return f"{separator}{name}={MASK}"
    return match.group(0)


def redact_text(text: str) -> str:
    """Free text with every known secret value, URL credential and secret-shaped token masked."""
    # Only ASCII is lowered here exactly as the rules' IGNORECASE matches it (Unicode folds more, e.g. "ſ" ~ "s").
    if text.isascii() and _SHAPE_NEEDLES.search(text.lower()) is None:
        # Masking puts in only "*", which no needle has, so no rule can apply after it either.
        return _scrub_known(text)
    return _redact_text_fully(text)


def _redact_text_fully(text: str) -> str:
    text = redact_url(_scrub_known(text))
    for pattern, replacement in _SHAPES:
        text = pattern.sub(replacement, text)
    return text


def redact_provider_text(text: str) -> str:
    """A provider's own error text: as `redact_text`, and long key-like tokens too (servers quote keys)."""
    return _KEY_LIKE.sub(MASK, redact_text(text))


def redact(value: Any, field: str = "") -> Any:
    """A copy of a JSON-like value with secrets masked. Strings under a secret-looking field name are masked
    whole; counters such as `input_tokens` stay readable because only strings are masked by name."""
    return _copy_leaves(value, field, _redact_leaf)[0]


def _redact_leaf(value: Any, field: str) -> Any:
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    if isinstance(value, str):
        if value and _is_secret_field(field):
            return MASK
        return redact_text(value)
    return value


def _is_secret_field(field: str) -> bool:
    # Field names repeat (log keys, contract fields); a publisher's long or endless names are not kept.
    return _is_secret_short_field(field) if len(field) <= 64 else SECRET_FIELD.search(field) is not None


@functools.lru_cache(maxsize=4096)
def _is_secret_short_field(field: str) -> bool:
    return bool(field) and SECRET_FIELD.search(field) is not None


def _copy_leaves(value: Any, field: str, leaf: Callable[[Any, str], Any]) -> tuple[Any, bool]:
    """A copy of a JSON-like tree with `leaf(value, field name)` applied to everything that is not a dict or a
    list, and whether any leaf changed. A loop with its own stack, not recursion: a publisher chooses how deep
    its body is nested, and the copy must not run out of the interpreter's stack on the way."""
    root: list[Any] = [None]
    changed = False
    pending: list[tuple[Any, str, Any, Any]] = [(value, field, root, 0)]
    while pending:
        item, name, parent, slot = pending.pop()
        if isinstance(item, dict):
            parent[slot] = mapping = dict.fromkeys(item)
            pending.extend((child, str(key), mapping, key) for key, child in item.items())
        elif isinstance(item, list | tuple):
            parent[slot] = sequence = [None] * len(item)
            pending.extend((child, name, sequence, index) for index, child in enumerate(item))
        else:
            parent[slot] = masked = leaf(item, name)
            changed = changed or (masked is not item and masked != item)
    return root[0], changed


def redact_body(body: bytes) -> bytes | None:
    """A message body with its secrets masked before it is parked, or None when it holds none.

    In a JSON object the `provider` table (a `test_connection` draft's literal keys) is masked like operator
    output; everywhere else only known secret values and PEM blocks are, so the incident stays as it was sent
    and a replay still means the same request. Bytes that are not UTF-8 are read as Latin-1, which maps every
    byte, so a PEM block or known secret inside them is still found and everything else is kept."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        data = None
    if isinstance(data, dict):
        masked_json = _masked_json(data)
        if masked_json is not _TOO_DEEP_TO_WRITE:
            return masked_json
    try:
        text, encoding = body.decode("utf-8"), "utf-8"
    except UnicodeDecodeError:
        text, encoding = body.decode("latin-1"), "latin-1"
    stripped = _strip_secrets(text)
    return stripped.encode(encoding, "replace") if stripped != text else None


_TOO_DEEP_TO_WRITE = b""
# In JSON text: a `"key": "value` pair, the value masked when the key looks secret. Each string is read
# possessively to its closing quote, and only an unescaped quote opens one, so no character is read twice over
# (a run of `\"` would otherwise be read again from each of its quotes).
_JSON_PAIR = re.compile(
    r'(?P<key>(?<!\\)"(?P<name>(?:[^"\\]|\\.)*+)"\s*+:\s*+")(?P<value>(?:[^"\\]|\\.)*+)(?P<end>"|\Z)'
)


def _mask_secret_pair(match: re.Match[str]) -> str:
    if not _is_secret_field(match["name"]):
        return match[0]
    return f"{match['key']}{MASK}{match['end']}"


def redact_cut_body(prefix: bytes) -> bytes | None:
    """The prefix of a body cut at the size limit, masked with every rule, or None when it holds nothing to
    mask. Cut, it is no longer JSON, so a draft's keys cannot be found by field, and it can no longer be
    replayed, so nothing is lost by masking as much as provider error text is; undecodable bytes are kept."""
    text = prefix.decode("utf-8", "surrogateescape")
    masked = _JSON_PAIR.sub(_mask_secret_pair, redact_provider_text(text))
    return masked.encode("utf-8", "surrogateescape") if masked != text else None


def _masked_json(data: dict[str, Any]) -> bytes | None:
    """The masked object as JSON, None when nothing was masked, or `_TOO_DEEP_TO_WRITE` when the JSON writer
    refuses its depth (orjson reads 1,024 levels but writes 255): then the body is masked as text instead."""
    masked: dict[str, Any] = {}
    changed = False
    for key, item in data.items():
        if key == "provider":
            masked[key], item_changed = _copy_leaves(item, "", _redact_leaf)
        else:
            masked[key], item_changed = _copy_leaves(item, key, _strip_leaf)
        changed = changed or item_changed
    if not changed:
        return None
    try:
        return orjson.dumps(masked)
    except orjson.JSONEncodeError:
        return _TOO_DEEP_TO_WRITE


def _strip_leaf(value: Any, field: str) -> Any:
    return _strip_secrets(value) if isinstance(value, str) else value


def _strip_secrets(text: str) -> str:
    """Known secret values and PEM blocks masked in a text, nothing else."""
    return PEM_BLOCK.sub(PEM_MASKED, _scrub_known(text))


def redact_log_event(logger: Any, method: str, event: MutableMapping[str, Any]) -> Mapping[str, Any]:
    """structlog processor, the last before rendering: no log line carries a secret, whoever wrote it."""
    # `redact` over the event, with its flat part (nearly every field: short strings and numbers) done inline.
    masked: dict[str, Any] = {}
    for key, value in event.items():
        if isinstance(value, str):
            masked[key] = MASK if value and _is_secret_field(str(key)) else redact_text(value)
        elif isinstance(value, bool | int | float | None):
            masked[key] = value
        else:
            masked[key] = redact(value, str(key))
    return masked
