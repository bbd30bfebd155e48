"""Where and how spans are exported, read from the standard OTEL_EXPORTER_OTLP_* and OTEL_BSP_* variables."""

import os
import ssl
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Final
from urllib.parse import urlsplit
from urllib.request import getproxies, proxy_bypass

import structlog
from opentelemetry.util.re import parse_env_headers

log = structlog.get_logger("worker.tracing.otlp_config")

DEFAULT_ENDPOINT: Final = "http://localhost:4318"
TRACES_PATH: Final = "v1/traces"
DEFAULT_TIMEOUT_S: Final = 10.0
COMPRESSIONS: Final = ("none", "gzip", "deflate")
# OpenTelemetry Python's own extension: a `requests.Session` from a plug-in, which only its exporter can use.
CREDENTIAL_PROVIDERS: Final = (
    "OTEL_PYTHON_EXPORTER_OTLP_HTTP_CREDENTIAL_PROVIDER",
    "OTEL_PYTHON_EXPORTER_OTLP_HTTP_TRACES_CREDENTIAL_PROVIDER",
)


@dataclass(frozen=True)
class OtlpTarget:
    """The OTLP/HTTP traces endpoint and how to reach it, with the SDK exporter's precedence: the TRACES_
    variable, then the general one, then the default."""

    endpoint: str = f"{DEFAULT_ENDPOINT}/{TRACES_PATH}"
    headers: Mapping[str, str] = field(default_factory=dict)
    timeout_s: float = DEFAULT_TIMEOUT_S
    compression: str = "none"
    certificate: str | None = None  # CA bundle to verify the collector with (else the system's)
    client_certificate: str | None = None
    client_key: str | None = None
    proxy: str | None = None  # from HTTP(S)_PROXY and NO_PROXY, as the SDK's exporter (requests) uses them

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> "OtlpTarget":
        def setting(name: str) -> str | None:
            return environ.get(f"OTEL_EXPORTER_OTLP_TRACES_{name}") or environ.get(f"OTEL_EXPORTER_OTLP_{name}")

        endpoint = environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
        if not endpoint:
            base = environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or DEFAULT_ENDPOINT
            endpoint = f"{base.removesuffix('/')}/{TRACES_PATH}"
        compression = (setting("COMPRESSION") or "none").strip().lower()
        if compression not in COMPRESSIONS:
            log.warning("tracing_compression_unsupported", compression=compression, supported=COMPRESSIONS)
            compression = "none"
        return cls(
            endpoint=endpoint,
            headers=parse_env_headers(setting("HEADERS") or "", liberal=True),
            timeout_s=_number(setting("TIMEOUT"), DEFAULT_TIMEOUT_S, "OTEL_EXPORTER_OTLP_TIMEOUT"),
            compression=compression,
            certificate=setting("CERTIFICATE"),
            client_certificate=setting("CLIENT_CERTIFICATE"),
            client_key=setting("CLIENT_KEY"),
            proxy=_proxy_for(endpoint),
        )

    def ssl_context(self) -> ssl.SSLContext | None:
        """For an https endpoint: the configured CA bundle (or the system's) and the client certificate, if any."""
        if not self.endpoint.lower().startswith("https:"):
            return None
        context = ssl.create_default_context(cafile=self.certificate)
        if self.client_certificate:
            # No password is configured: an encrypted key fails to load instead of OpenSSL asking on stdin.
            context.load_cert_chain(self.client_certificate, self.client_key, password=_no_password)
        return context


@dataclass(frozen=True)
class BatchLimits:
    """The batch span processor's settings (OTEL_BSP_*), with its defaults and its rules."""

    schedule_delay_s: float = 5.0
    max_queue_size: int = 2048
    max_export_batch_size: int = 512
    export_timeout_s: float = 30.0

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> "BatchLimits":
        default = cls()
        limits = cls(
            schedule_delay_s=_number(environ.get("OTEL_BSP_SCHEDULE_DELAY"), 5000, "OTEL_BSP_SCHEDULE_DELAY") / 1000,
            max_queue_size=int(_number(environ.get("OTEL_BSP_MAX_QUEUE_SIZE"), 2048, "OTEL_BSP_MAX_QUEUE_SIZE")),
            max_export_batch_size=int(
                _number(environ.get("OTEL_BSP_MAX_EXPORT_BATCH_SIZE"), 512, "OTEL_BSP_MAX_EXPORT_BATCH_SIZE")
            ),
            export_timeout_s=_number(environ.get("OTEL_BSP_EXPORT_TIMEOUT"), 30000, "OTEL_BSP_EXPORT_TIMEOUT") / 1000,
        )
        # The SDK refuses these at start-up; here they fall back to the defaults with a warning instead.
        if min(limits.schedule_delay_s, limits.max_queue_size, limits.max_export_batch_size) <= 0:
            log.warning("tracing_batch_settings_invalid", hint="OTEL_BSP_* must be positive", using="defaults")
            return default
        if limits.max_export_batch_size > limits.max_queue_size:
            log.warning("tracing_batch_settings_invalid", hint="max export batch size above the queue size")
            return default
        return limits


def _proxy_for(url: str) -> str | None:
    parts = urlsplit(url)
    proxy = getproxies().get(parts.scheme)
    if not proxy or proxy_bypass(parts.hostname or ""):
        return None
    return proxy


def credential_provider_requested(environ: Mapping[str, str] = os.environ) -> bool:
    return any(environ.get(name) for name in CREDENTIAL_PROVIDERS)


def _number(raw: str | None, default: float, name: str) -> float:
    if raw is None or not raw.strip():
        return float(default)
    try:
        return float(raw)
    except ValueError:
        log.warning("tracing_setting_invalid", variable=name, value=raw, using=default)
        return float(default)


def _no_password() -> bytes:
    return b""
