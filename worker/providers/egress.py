"""One egress policy for every outbound connection: the address actually connected to, no redirects, bounded answers."""

import errno
import ipaddress
import re
import socket
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import aiohttp
from aiohappyeyeballs import AddrInfoType
from aiohttp.client_middlewares import ClientHandlerType
from yarl import URL

from worker.errors import ErrorClass, ProviderError

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
DEFAULT_MAX_RESPONSE_BYTES = 8 * 1024 * 1024
# A draft's endpoint is the publisher's choice: what a probe reads (a model list, a short completion) is far smaller.
DRAFT_MAX_RESPONSE_BYTES = 1024 * 1024
READ_CHUNK_BYTES = 64 * 1024
# Cloud metadata and host-agent services: reaching them would hand out the worker's own cloud credentials.
METADATA_ADDRESSES = frozenset(
    ipaddress.ip_address(a)
    for a in (
        "169.254.169.254",  # AWS, GCP, Azure, OpenStack, DigitalOcean
        "169.254.170.2",  # AWS ECS task credentials
        "169.254.170.23",  # AWS EKS pod identity
        "fd00:ec2::254",  # AWS IMDS over IPv6
        "fd00:ec2::23",  # AWS EKS pod identity over IPv6
        "100.100.100.200",  # Alibaba Cloud
        "192.0.0.192",  # Oracle Cloud
        "168.63.129.16",  # Azure WireServer
    )
)
METADATA_HOSTNAMES = frozenset({"metadata.google.internal", "metadata.goog", "metadata", "instance-data"})
# The well-known prefix says where its IPv4 address is: the last 32 bits.
NAT64 = (ipaddress.ip_network("64:ff9b::/96"),)
# In the local-use prefix (RFC 8215) each network picks its own prefix length, so the IPv4 host may sit in any of
# RFC 6052's layouts for /48, /56, /64 or /96 (bits 64-71 are never part of it): a reading that is a metadata or
# link-local address refuses it, and drafts refuse the range outright as private (Python 3.11 counts it as global).
LOCAL_NAT64 = ipaddress.ip_network("64:ff9b:1::/48")
_LOCAL_NAT64_LAYOUTS = (((48, 64), (72, 88)), ((56, 64), (72, 96)), ((72, 104),), ((96, 128),))
IPV4_COMPATIBLE = ipaddress.ip_network("::/96")
# A DNS name never ends in an all-numeric label: such a host is an IPv4 address in a legacy notation
# (octal 0177.0.0.1, hex 0x7f.1, decimal 2130706433) that the C resolver would quietly accept.
NUMERIC_LABEL = re.compile(r"0x[0-9a-f]*|[0-9]+")
REDIRECT_STATUSES = range(300, 400)
# Connect errors carry this errno so they survive aiohappyeyeballs folding several attempts into one OSError.
REFUSED_ERRNO = errno.EACCES


class EgressRefused(OSError):
    """The policy refuses the address a connection was about to be made to (raised before `connect()`)."""

    def __init__(self, address: str, reason: str) -> None:
        super().__init__(REFUSED_ERRNO, f"the egress policy refuses {address}: {reason}")


class RedirectRefused(aiohttp.ClientError):
    """A 3xx answer: redirects are never followed, so the target is named, not fetched."""

    def __init__(self, status: int, location: str) -> None:
        super().__init__(f"{status} redirect to {location}")
        self.status = status
        self.location = location


class ResponseTooLarge(aiohttp.ClientError):
    """The answer is larger than the configured cap (declared, or counted after decompression)."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"the response is larger than {limit} bytes")
        self.limit = limit


def _embedded_ipv4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv4-mapped or NAT64 address stands for (the networks route it there)."""
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if any(ip in net for net in NAT64):
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return None


def _local_nat64_readings(ip: ipaddress.IPv6Address) -> list[ipaddress.IPv4Address]:
    """The IPv4 addresses a local-use NAT64 address may stand for, one per prefix length the network may use."""
    bits = int(ip)
    readings = []
    for layout in _LOCAL_NAT64_LAYOUTS:
        value = 0
        for start, end in layout:
            value = (value << (end - start)) | ((bits >> (128 - end)) & ((1 << (end - start)) - 1))
        readings.append(ipaddress.IPv4Address(value))
    return readings


def _always_refused(ip: IPAddress) -> str | None:
    """What no profile may reach: metadata services, link-local, unspecified, multicast, reserved."""
    if ip in METADATA_ADDRESSES:
        return "a cloud metadata service"
    if ip.is_unspecified:
        return "the unspecified address"
    if ip.is_link_local:
        return "a link-local address"
    if ip.is_multicast:
        return "a multicast address"
    if isinstance(ip, ipaddress.IPv4Address) and ip.is_reserved:
        return "a reserved address"
    if isinstance(ip, ipaddress.IPv6Address) and (
        ip.sixtofour is not None or ip.teredo is not None or (ip in IPV4_COMPATIBLE and not ip.is_loopback)
    ):
        # 6to4, Teredo and IPv4-compatible forms tunnel to an IPv4 host the policy cannot see through.
        return "an IPv4 address embedded in a deprecated IPv6 transition form"
    return None


def parse_address(address: str) -> IPAddress | None:
    """An IP address in canonical notation (an IPv6 zone such as `%eth0` dropped), or None."""
    try:
        return ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return None


@dataclass(frozen=True)
class EgressPolicy:
    """Where connections may go. Stored tenants: anything but metadata, link-local, unspecified and tunnelled
    forms. Drafts from messages: additionally no loopback and no private range outside `allowed_networks`."""

    drafts: bool = False
    allowed_networks: tuple[IPNetwork, ...] = ()
    max_response_bytes: int = DEFAULT_MAX_RESPONSE_BYTES

    @classmethod
    def for_drafts(cls, cidrs: Iterable[str], max_response_bytes: int = DEFAULT_MAX_RESPONSE_BYTES) -> "EgressPolicy":
        networks = tuple(ipaddress.ip_network(cidr, strict=False) for cidr in cidrs)
        capped = min(max_response_bytes, DRAFT_MAX_RESPONSE_BYTES)
        return cls(drafts=True, allowed_networks=networks, max_response_bytes=capped)

    def refusal(self, address: str) -> str | None:
        """Why a connection to this IP address is refused, or None when it may be made."""
        ip = parse_address(address)
        if ip is None:
            return "not an IP address in canonical notation"
        if isinstance(ip, ipaddress.IPv6Address) and (embedded := _embedded_ipv4(ip)) is not None:
            reason = self.refusal(str(embedded))
            return f"it embeds {embedded}, {reason}" if reason else None
        if isinstance(ip, ipaddress.IPv6Address) and ip in LOCAL_NAT64:
            # Only what no profile may reach counts: the readings of the layouts a network does not use are
            # noise (0.0.0.0 and the like), and refusing on those would refuse every local NAT64 address.
            for reading in _local_nat64_readings(ip):
                if reading in METADATA_ADDRESSES or reading.is_link_local:
                    return f"it may embed {reading}, {_always_refused(reading)}"
        if (reason := _always_refused(ip)) is not None:
            return reason
        if not self.drafts or any(ip in net for net in self.allowed_networks):
            return None
        if ip.is_loopback:
            return "a loopback address (a configuration from a message may not reach the worker's host)"
        if not ip.is_global or ip in LOCAL_NAT64:
            return "a private address (allow its range with --allow-draft-cidr)"
        return None

    def host_refusal(self, host: str) -> str | None:
        """Why a URL's host is refused before any lookup: metadata names, legacy numeric forms, refused literals."""
        name = host.strip("[]").rstrip(".").lower()
        if name in METADATA_HOSTNAMES:
            return "a cloud metadata service"
        if parse_address(name) is not None:
            return self.refusal(name)
        if NUMERIC_LABEL.fullmatch(name.rsplit(".", 1)[-1]):
            return "not a canonical address (numeric forms such as 0177.0.0.1 or 2130706433 are refused)"
        return None

    def open_socket(self, addr_info: AddrInfoType) -> socket.socket:
        """aiohttp's socket factory: sees the exact address about to be connected to, IP literals included."""
        family, kind, proto, _, sockaddr = addr_info
        address = str(sockaddr[0])
        if (reason := self.refusal(address)) is not None:
            raise EgressRefused(address, reason)
        return socket.socket(family, kind, proto)

    async def guard_response(
        self, request: aiohttp.ClientRequest, handler: ClientHandlerType
    ) -> aiohttp.ClientResponse:
        """Session middleware, run for every hop: a 3xx stops here unread; a body is read only up to the cap."""
        response = await handler(request)
        if response.status in REDIRECT_STATUSES:
            location = public_url(response.headers.get("Location", ""), base=request.url)
            response.release()
            raise RedirectRefused(response.status, location)
        try:
            body = await read_capped(response, self.max_response_bytes)
        except BaseException:
            response.close()
            raise
        # Callers (our own, aiobotocore's, google-auth's) all call `read()`, which answers from this cache.
        response._body = body
        return response


async def read_capped(response: aiohttp.ClientResponse, limit: int) -> bytes:
    """The body, refused when its declared length or its decoded length passes `limit`."""
    declared = response.content_length
    if declared is not None and declared > limit:
        raise ResponseTooLarge(limit)
    chunks: list[bytes] = []
    size = 0
    # aiohttp decompresses as it reads, so the count is of decoded bytes: a gzip bomb stops at the cap.
    while chunk := await response.content.read(READ_CHUNK_BYTES):
        size += len(chunk)
        if size > limit:
            raise ResponseTooLarge(limit)
        chunks.append(chunk)
    return b"".join(chunks)


def public_url(url: str, base: URL | None = None) -> str:
    """A URL fit for a message: no user, password, query or fragment (they may carry credentials)."""
    try:
        parsed = URL(url)
        if base is not None and not parsed.is_absolute():
            parsed = base.join(parsed)
        return str(parsed.with_user(None).with_query(None).with_fragment(None))[:200]
    except (ValueError, TypeError):
        return "(an unparseable Location)"


def egress_session(policy: EgressPolicy, **connector: Any) -> aiohttp.ClientSession:
    """An HTTP session whose every connection and every answer goes through `policy`."""
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(socket_factory=policy.open_socket, **connector),
        middlewares=(policy.guard_response,),
        raise_for_status=False,
        trust_env=False,  # an environment proxy would make the policy check the proxy, not the provider
    )


def egress_error(exc: BaseException, who: str) -> ProviderError | None:
    """The ProviderError for a policy refusal anywhere in `exc`'s chain, or None when it is not one."""
    seen: BaseException | None = exc
    for _ in range(8):  # exception chains can loop through __context__
        if seen is None:
            return None
        if isinstance(seen, RedirectRefused):
            return ProviderError(
                ErrorClass.BAD_REQUEST,
                f"{who} answered {seen.status} redirecting to {seen.location}; redirects are not followed: "
                "configure the final URL",
                code="redirect_refused",
                status=seen.status,
            )
        if isinstance(seen, ResponseTooLarge):
            # The same call would get the same answer, so retrying it is no use: a bad request, not transient.
            return ProviderError(
                ErrorClass.BAD_REQUEST,
                f"{who} answered with more than {seen.limit} bytes (--max-response-bytes)",
                code="provider_response_too_large",
            )
        if isinstance(seen, OSError) and seen.errno == REFUSED_ERRNO and "egress policy" in str(seen):
            return ProviderError(
                ErrorClass.BAD_REQUEST, f"cannot connect to {who}: {seen.strerror}", code="egress_refused"
            )
        seen = _next_cause(seen)
    return None


def _next_cause(exc: BaseException) -> BaseException | None:
    """aiohttp keeps the OS error in `os_error`, botocore in `kwargs['error']`, the rest in `__cause__`."""
    for inner in (getattr(exc, "os_error", None), (getattr(exc, "kwargs", None) or {}).get("error")):
        if isinstance(inner, BaseException) and inner is not exc:
            return inner
    return exc.__cause__ or exc.__context__
