"""What a provider configuration carried in a message may not do: name secret references, or reach addresses
the draft egress policy refuses (a test request must not read the worker's secrets or probe its network)."""

import asyncio
import socket
from collections.abc import Awaitable, Callable
from urllib.parse import urlsplit

from contracts import ConnectionReport
from contracts.tenant import ProviderSettings
from worker.providers.base import Provider
from worker.providers.egress import EgressPolicy, egress_session
from worker.providers.pool import build_provider, endpoints
from worker.secrets import is_reference
from worker.tenants import secret_fields

Builder = Callable[[ProviderSettings], Provider]


class ConfigRefused(Exception):
    """A configuration carried in a message that the worker will not test (secret references, unsafe hosts)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def refuse_secret_references(settings: ProviderSettings) -> None:
    """A message may carry literal secrets only: a reference would make the worker read its own secrets."""
    references = [name for name, value in secret_fields(settings) if is_reference(value)]
    if references:
        raise ConfigRefused(
            "secret_reference_refused",
            f"provider.{', provider.'.join(references)}: env:/file: references are not accepted in a message; "
            "send the secret's value, or save the configuration and test the stored one",
        )
    if settings.kind == "bedrock" and settings.role_arn and settings.access_key_id is None:
        # Assuming a role with no keys of its own would lend the worker's AWS identity to whoever sent the message.
        raise ConfigRefused(
            "secret_reference_refused",
            "provider.role_arn without access_key_id / secret_access_key would be assumed with the worker's own AWS "
            "identity; that cannot be tested from a message: save the configuration and test the stored one",
        )


async def refuse_unsafe_endpoints(settings: ProviderSettings, policy: EgressPolicy) -> None:
    """Refuse now, with a clear reason, a configuration whose endpoints the egress policy would refuse at connect
    time anyway (the connection-level check is what holds; this one only makes the answer readable)."""
    loop = asyncio.get_running_loop()
    for url in endpoints(settings):
        parts = urlsplit(url)
        host = (parts.hostname or "").rstrip(".").lower()
        if parts.scheme not in ("http", "https") or not host:
            raise ConfigRefused("endpoint_refused", f"{url!r} is not an http(s) URL")
        if (reason := policy.host_refusal(host)) is not None:
            raise ConfigRefused("endpoint_refused", f"{host} is {reason}; it cannot be tested")
        try:
            infos = await loop.getaddrinfo(host, parts.port or 443, type=socket.SOCK_STREAM)
        except OSError:
            continue  # does not resolve now: the connection, checked when made, will say what it reached
        for info in infos:
            if (reason := policy.refusal(str(info[4][0]))) is not None:
                raise ConfigRefused(
                    "endpoint_refused", f"{host} resolves to {info[4][0]}, {reason}; it cannot be tested"
                )


async def with_guarded_session(
    policy: EgressPolicy, run: Callable[[Builder], Awaitable[ConnectionReport]]
) -> ConnectionReport:
    """Runs `run` with providers whose every connection goes through `policy` (for configs from messages)."""
    async with egress_session(policy) as session:
        return await run(lambda settings: build_provider(settings, session))
