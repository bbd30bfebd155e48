"""What a provider configuration carried in a message may not do: name secret references, or reach
link-local and cloud-metadata addresses (a test request must not read the worker's secrets or probe its network)."""

import asyncio
import ipaddress
import socket
from collections.abc import Awaitable, Callable, Iterator
from urllib.parse import urlsplit

import aiohttp
import orjson
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import DefaultResolver
from pydantic import BaseModel, SecretStr

from contracts import ConnectionReport
from contracts.tenant import ProviderSettings
from worker.errors import ErrorClass, ProviderError
from worker.providers import FACTORIES
from worker.providers.base import Provider
from worker.providers.bedrock import BedrockProvider
from worker.secrets import is_reference

Builder = Callable[[ProviderSettings], Provider]
# Cloud metadata services: reading them would hand out the worker's own cloud credentials.
METADATA_ADDRESSES = {
    ipaddress.ip_address("169.254.169.254"),  # AWS, GCP, Azure, OpenStack
    ipaddress.ip_address("169.254.170.2"),  # AWS ECS task credentials
    ipaddress.ip_address("fd00:ec2::254"),  # AWS IMDS over IPv6
    ipaddress.ip_address("100.100.100.200"),  # Alibaba Cloud
    ipaddress.ip_address("192.0.0.192"),  # Oracle Cloud
}
METADATA_HOSTNAMES = {"metadata.google.internal", "metadata.goog", "metadata"}


class ConfigRefused(Exception):
    """A configuration carried in a message that the worker will not test (secret references, unsafe hosts)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def secret_fields(model: BaseModel, prefix: str = "") -> Iterator[tuple[str, SecretStr]]:
    for name in type(model).model_fields:
        value = getattr(model, name)
        if isinstance(value, SecretStr):
            yield f"{prefix}{name}", value


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


def blocked_address(address: str) -> bool:
    """Link-local and metadata addresses are refused; loopback and private networks stay allowed."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return True
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip in METADATA_ADDRESSES or ip.is_link_local or ip.is_unspecified or ip.is_multicast


async def refuse_unsafe_endpoints(settings: ProviderSettings) -> None:
    """Resolve every endpoint now and refuse the configuration if any lands on a forbidden address."""
    loop = asyncio.get_running_loop()
    for url in endpoints_of(settings):
        parts = urlsplit(url)
        host = (parts.hostname or "").rstrip(".").lower()
        if parts.scheme not in ("http", "https") or not host:
            raise ConfigRefused("endpoint_refused", f"{url!r} is not an http(s) URL")
        if host in METADATA_HOSTNAMES:
            raise ConfigRefused("endpoint_refused", f"{host} is a cloud metadata service; it cannot be tested")
        try:
            infos = await loop.getaddrinfo(host, parts.port or 443, type=socket.SOCK_STREAM)
        except OSError:
            continue  # does not resolve: the probe will report it unreachable
        for info in infos:
            if blocked_address(str(info[4][0])):
                raise ConfigRefused(
                    "endpoint_refused",
                    f"{host} resolves to {info[4][0]}, a link-local or cloud-metadata address; it cannot be tested",
                )


class GuardedResolver(AbstractResolver):
    """Resolves like aiohttp does but drops forbidden addresses, so a DNS answer that changes after the check
    (DNS rebinding) still cannot reach a metadata service."""

    def __init__(self) -> None:
        self._inner = DefaultResolver()

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        allowed = [r for r in await self._inner.resolve(host, port, family) if not blocked_address(r["host"])]
        if not allowed:
            raise OSError(f"{host} resolves only to refused addresses")
        return allowed

    async def close(self) -> None:
        await self._inner.close()


async def with_guarded_session(run: Callable[[Builder], Awaitable[ConnectionReport]]) -> ConnectionReport:
    """Runs `run` with providers whose HTTP never reaches a refused address (for configs from messages)."""
    resolver = GuardedResolver()
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(resolver=resolver)) as session:

        def build(settings: ProviderSettings) -> Provider:
            if settings.kind == "bedrock":
                return BedrockProvider(settings, resolver=resolver)
            factory = FACTORIES.get(settings.kind)
            if factory is None:
                raise ProviderError(
                    ErrorClass.BAD_REQUEST,
                    f"provider kind {settings.kind!r} is not available",
                    code="provider_unsupported",
                )
            return factory(settings, session)

        try:
            return await run(build)
        finally:
            await resolver.close()  # connectors close only the resolvers they made themselves
