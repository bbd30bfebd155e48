"""Worker settings from flags and environment."""

import os
from dataclasses import dataclass, field
from pathlib import Path

from contracts import DEFAULT_ATLAS_CLOUD_EXCHANGE, DEFAULT_NAMESPACE, Topology
from worker.broker.limits import MAX_BODY_BYTES, MAX_BODY_ENTRIES
from worker.broker.publishers import PublisherRules
from worker.handling.ladder import RetryLadder
from worker.providers.breaker import BreakerPolicy
from worker.providers.egress import DEFAULT_MAX_RESPONSE_BYTES, EgressPolicy

DEFAULT_AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/"
DEFAULT_TENANTS_DIR = "./tenants"


def env_amqp_url() -> str:
    return os.environ.get("AMQP_URL", DEFAULT_AMQP_URL)


class SettingsError(ValueError):
    """A setting from the environment that cannot be what the operator meant."""


def env_tenants_dir() -> Path:
    """`ATLAS_TENANTS_DIR`, or `./tenants` when it is not set. Set but blank (a compose or Helm value left unfilled)
    is refused: as a path it would mean the working directory, whose stray `.toml` files are no tenants."""
    value = os.environ.get("ATLAS_TENANTS_DIR")
    if value is None:
        return Path(DEFAULT_TENANTS_DIR)
    if not value.strip():
        raise SettingsError("ATLAS_TENANTS_DIR is set but empty: set it to the tenants directory, or unset it")
    return Path(value)


@dataclass(frozen=True)
class WorkerSettings:
    amqp_url: str = field(default_factory=env_amqp_url)
    tenants_dir: Path = field(default_factory=env_tenants_dir)
    namespace: str = DEFAULT_NAMESPACE
    prefetch: int = 64
    atlas_cloud_exchange: str = DEFAULT_ATLAS_CLOUD_EXCHANGE
    grace_s: float = 30.0
    delivery_limit: int = 20
    ladder: RetryLadder = field(default_factory=RetryLadder)
    tenants_poll_s: float = 2.0
    breaker: BreakerPolicy = field(default_factory=BreakerPolicy)
    metrics_port: int | None = None
    metrics_host: str = "0.0.0.0"  # every interface: Prometheus scrapes the pod or container from outside
    connect_timeout_s: float = 15.0  # for the first broker connection; later reconnects are the library's
    max_body_bytes: int = MAX_BODY_BYTES
    max_body_entries: int = MAX_BODY_ENTRIES
    header_key: str | None = None  # env:NAME or file:/path; signs the worker's own headers
    header_key_previous: tuple[str, ...] = ()  # keys being rotated out: believed, never signed with
    publishers: PublisherRules = field(default_factory=PublisherRules)
    loop_lag_interval_s: float = 0.1  # how often the event loop's lag is sampled
    max_response_bytes: int = DEFAULT_MAX_RESPONSE_BYTES
    allow_draft_cidrs: tuple[str, ...] = ()  # private ranges a draft from a message may reach (none by default)
    freeze_heap: bool = False  # gc.freeze() once before consuming: the worker's own process, not embedded apps

    @property
    def tenant_egress(self) -> EgressPolicy:
        """Stored tenants: their own networks stay reachable, metadata and link-local never."""
        return EgressPolicy(max_response_bytes=self.max_response_bytes)

    @property
    def draft_egress(self) -> EgressPolicy:
        """Drafts from messages: additionally no loopback, and private ranges only where the operator allows."""
        return EgressPolicy.for_drafts(self.allow_draft_cidrs, self.max_response_bytes)

    @property
    def topology(self) -> Topology:
        return Topology(self.namespace)
