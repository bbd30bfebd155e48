"""What a provider configuration carried in a message may not do: name secret references, or reach addresses
the draft egress policy refuses (a test request must not read the worker's secrets or probe its network)."""

import asyncio
import socket
from collections.abc import Awaitable, Callable
from urllib.parse import urlsplit

import orjson

from contracts import ConnectionReport
from contracts.tenant import ProviderSettings
from worker.providers.base import Provider
from worker.providers.egress import EgressPolicy, egress_session
from worker.providers.pool import ProviderPool
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


def endpoints_of(settings: ProviderSettings) -> list[str]:
    """Every URL the worker would contact for this configuration."""
    match settings.kind:
        case "openai_compatible" | "ollama":
            return [settings.base_url]
        case "azure_openai":
            return [settings.endpoint]
        case "bedrock":
            urls = [settings.endpoint_url or f"https://bedrock-runtime.{settings.region}.amazonaws.com"]
            if settings.role_arn:
                urls.append(settings.sts_endpoint_url or f"https://sts.{settings.region}.amazonaws.com")
            return urls
        case "vertex":
            host = f"{settings.location}-aiplatform.googleapis.com"
            urls = [settings.base_url or f"https://{host}"]
            try:
                key = orjson.loads(settings.service_account.get_secret_value())
            except orjson.JSONDecodeError:
                key = None
            if isinstance(key, dict) and isinstance(key.get("token_uri"), str):
                urls.append(key["token_uri"])  # google-auth posts the signed assertion here
            return urls
    raise AssertionError(settings)


async def refuse_unsafe_endpoints(settings: ProviderSettings, policy: EgressPolicy) -> None:
    """Refuse now, with a clear reason, a configuration whose endpoints the egress policy would refuse at connect
    time anyway (the connection-level check is what holds; this one only makes the answer readable)."""
    loop = asyncio.get_running_loop()
    for url in endpoints_of(settings):
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
        return await run(ProviderPool(session).build)
