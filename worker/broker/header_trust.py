"""Which of the worker's own headers on a delivery to believe: the ones it signed, or, without a header key,
the ones on a message the broker brought back from the worker's retry ladder.

A publisher can write any header, `atlas-attempts` included. Believing one on a fresh publish would let it
skip the retry ladder or forge where a request came from, so these headers count only when vouched for:

- with a header key (`--header-key`), by an HMAC-SHA256 per header, over the request id, the header's name
  and its value, kept in the `atlas-signature` table (a header a replay strips does not void the others);
- without one, by the broker's `x-death`: the latest death must be a TTL expiry on one of `{ns}.retry.*`.
  A publisher can forge `x-death` too, so production deployments should set a key.

Headers not vouched for are ignored, as if the request were fresh; the request itself is not refused."""

import hashlib
import hmac
from collections.abc import Mapping, Sequence
from typing import Any, Final

from pydantic import SecretStr

from contracts import Header, Topology
from worker.broker.headers import latest_death, read_text
from worker.broker.limits import ERROR_MESSAGE_LIMIT, SHORT_HEADER_CHARS
from worker.errors import ProviderError
from worker.exit_codes import ExitCode, StartupError
from worker.handling.history import HISTORY_MAX_BYTES
from worker.secrets import REFERENCE_PREFIXES, resolve_secret

# The worker's headers that change what it does with a request, or that claim where it came from.
VOUCHED: Final = (
    Header.ATTEMPTS,
    Header.DEFERRALS,
    Header.FIRST_FAILURE_AT,
    Header.ORIGINAL_EXCHANGE,
    Header.ORIGINAL_ROUTING_KEY,
    Header.REROUTED_FROM_TENANT,
    Header.REROUTED_AT,
    Header.RETRY_LEVEL,
    Header.SETTLE_SEQ,
    Header.REDELIVERIES,
    Header.CIRCUIT_WAITS,
    # The last real provider error, which a circuit wait carries on beside `circuit_open`.
    Header.ERROR_CODE,
    Header.ERROR_CLASS,
    Header.ERROR_MESSAGE,
    Header.PROVIDER_KIND,
    Header.LAST_FAILURE_AT,
    # The request's failed tries: a forged one on a fresh publish would tell the operator a false story.
    Header.HISTORY,
)
# The longest value the worker itself writes under each of them. A copy carries believed headers whole, so a
# longer one (forged beside an `x-death`, without a header key) is not believed: 17 of them could otherwise fill
# the copy's content-header frame past the broker's frame_max, which closes the worker's whole connection.
VALUE_LIMITS: Final = {Header.HISTORY: HISTORY_MAX_BYTES, Header.ERROR_MESSAGE: ERROR_MESSAGE_LIMIT}
MIN_KEY_BYTES: Final = 16


def load_key(reference: str | None, flag: str = "--header-key") -> bytes | None:
    """The header key behind `env:NAME` or `file:/path`, read when a command starts; None when unset. A literal
    key is refused: on a command line it would sit in `ps` output and shell history."""
    if reference is None:
        return None
    if not reference.startswith(REFERENCE_PREFIXES):
        raise StartupError(ExitCode.USAGE, f"{flag} takes a reference (env:NAME or file:/path), not the key")
    try:
        key = resolve_secret(SecretStr(reference)).encode()
    except ProviderError as exc:
        raise StartupError(ExitCode.USAGE, f"{flag}: {exc.message}") from None
    if len(key) < MIN_KEY_BYTES:
        raise StartupError(ExitCode.USAGE, f"{flag}: the key must be at least {MIN_KEY_BYTES} bytes")
    return key


def load_keys(reference: str | None, previous: Sequence[str] = ()) -> tuple[bytes | None, tuple[bytes, ...]]:
    """The signing key and the keys being rotated out (believed, never signed with), read when a command starts."""
    if previous and reference is None:
        raise StartupError(ExitCode.USAGE, "--header-key-previous needs --header-key: the key to sign with from now on")
    previous_keys = tuple(key for ref in previous if (key := load_key(ref, "--header-key-previous")) is not None)
    return load_key(reference), previous_keys


class HeaderTrust:
    """Signs the worker's headers on the copies it publishes, and says which ones on a delivery to believe."""

    def __init__(self, topology: Topology, key: bytes | None = None, previous: tuple[bytes, ...] = ()) -> None:
        """`key` signs and is believed; each of `previous` (keys being rotated out) is only believed."""
        self._retry_prefix = f"{topology.namespace}.retry."
        self._key = key
        self._believed_keys = (key, *previous) if key is not None else ()

    @property
    def signing(self) -> bool:
        return self._key is not None

    def believed(self, headers: Mapping[str, Any] | None, request_id: str | None) -> dict[str, Any]:
        """The vouched-for headers of a delivery; an empty dict for a fresh (or forged) one."""
        headers = headers or {}
        present = {name: headers[name] for name in VOUCHED if name in headers and _could_be_ours(name, headers[name])}
        if not present or request_id is None:
            return {}
        if self._key is None:
            return present if self._back_from_ladder(headers) else {}
        signatures = headers.get(Header.SIGNATURE)
        if not isinstance(signatures, Mapping):
            return {}
        return {
            name: value
            for name, value in present.items()
            if isinstance(signature := signatures.get(name), str)
            and any(
                (mac := _mac(key, request_id, name, value)) is not None and hmac.compare_digest(signature, mac)
                for key in self._believed_keys
            )
        }

    def signature(self, request_id: str | None, headers: Mapping[str, Any]) -> dict[str, Any]:
        """`{atlas-signature: {name: mac}}` for the vouched-for headers a copy carries (nothing without a key)."""
        if self._key is None or request_id is None:
            return {}
        key = self._key
        macs = {name: mac for name in VOUCHED if name in headers if (mac := _mac(key, request_id, name, headers[name]))}
        return {Header.SIGNATURE: macs} if macs else {}

    def _back_from_ladder(self, headers: Mapping[str, Any]) -> bool:
        latest = latest_death(headers)
        queue, reason = read_text(latest.get("queue")), read_text(latest.get("reason"))
        return (
            queue is not None
            and queue.startswith(self._retry_prefix)
            and queue.removeprefix(self._retry_prefix).isdigit()
            and reason == "expired"
        )


def _mac(key: bytes, request_id: str, name: str, value: Any) -> str | None:
    if isinstance(value, bool) or not isinstance(value, str | int):
        return None
    # Type-tagged and NUL-separated, so no value of one header can pass for another's.
    message = "\0".join((request_id, name, type(value).__name__, str(value))).encode()
    return hmac.new(key, message, hashlib.sha256).hexdigest()


def _could_be_ours(name: str, value: Any) -> bool:
    """A count, or a text no longer than the worker writes under this header."""
    if isinstance(value, int):
        return not isinstance(value, bool)
    return isinstance(value, str) and len(value) <= VALUE_LIMITS.get(name, SHORT_HEADER_CHARS)
