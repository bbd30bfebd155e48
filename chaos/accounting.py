"""The soak's verdict: what became of every request, from what was observed on the broker. Pure; no I/O."""

import hashlib
from collections import Counter, defaultdict
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson

BYOC_ONLY = frozenset({"fail_closed", "queue_and_retry"})  # policies whose data must never reach Atlas Cloud


@dataclass(frozen=True)
class Observation:
    """One message seen on a sink: a reply, a dead letter, or a reroute to the Atlas Cloud exchange."""

    sink: str  # reply | dead | cloud
    request_id: str | None
    tenant_id: str | None
    outcome: tuple[str, ...]  # what must be identical across duplicates: (sink, status or reason, result digest)
    correlation_ok: bool = True
    error_code: str = "-"  # detail that may differ between copies (e.g. the last failure of a retried request)
    rank: tuple[int, int] = (0, 0)  # (settle_seq, -redeliveries): the README's rule, highest is authoritative


def _rank(settle_seq: Any, redeliveries: Any) -> tuple[int, int]:
    def count(value: Any) -> int:
        return value if isinstance(value, int) and not isinstance(value, bool) else 0

    return count(settle_seq), -count(redeliveries)


def observe_reply(body: bytes, correlation_id: str | None) -> Observation:
    reply: dict[str, Any] = orjson.loads(body)
    result = reply.get("result")
    digest = hashlib.sha256(orjson.dumps(result, option=orjson.OPT_SORT_KEYS)).hexdigest()[:12] if result else "-"
    error = (reply.get("error") or {}).get("code") or "-"
    request_id = reply.get("request_id")
    provenance = reply.get("provenance") or {}
    return Observation(
        "reply",
        request_id,
        reply.get("tenant_id"),
        ("reply", str(reply.get("status")), digest),
        correlation_ok=correlation_id == request_id,
        error_code=error,
        rank=_rank(provenance.get("settle_seq"), provenance.get("redeliveries")),
    )


def observe_copy(sink: str, body: bytes, headers: Mapping[str, Any]) -> Observation:
    """A dead letter or reroute carries the original request body unchanged, plus our headers."""
    try:
        request: dict[str, Any] = orjson.loads(body)
    except orjson.JSONDecodeError:
        request = {}
    reason = str(headers.get("atlas-reason", "-"))
    rank = _rank(headers.get("atlas-settle-seq"), headers.get("atlas-redeliveries"))
    code = str(headers.get("atlas-error-code", "-"))
    return Observation(
        sink, request.get("request_id"), request.get("tenant_id"), (sink, reason), error_code=code, rank=rank
    )


@dataclass
class Accounting:
    published: int
    lost: list[str] = field(default_factory=list)
    inconsistent: list[str] = field(default_factory=list)  # more than one distinct terminal outcome
    duplicate_requests: int = 0
    duplicate_deliveries: int = 0
    duplicates_identical: int = 0  # every copy agrees (status and result)
    duplicates_explained: int = 0  # copies differ, but one outranks the others by the README's rule
    duplicates_differing: int = 0  # copies differ and the rule designates no single one: unexplained
    duplicates_other_error: int = 0  # copies agree on status and result but name a different last error
    circuit_failed_healthy: list[str] = field(default_factory=list)  # fated to succeed, ended on circuit_open
    cloud_leaks: list[str] = field(default_factory=list)  # BYOC-only tenants seen on the Atlas Cloud exchange
    bad_correlation: int = 0
    unknown: int = 0  # observations for request ids that were never published
    by_tenant: dict[str, Counter[str]] = field(default_factory=dict)

    @property
    def answered(self) -> int:
        return self.published - len(self.lost)


def account(
    published: Mapping[str, str],
    policies: Mapping[str, str],
    observations: Iterable[Observation],
    healthy: Collection[str] = frozenset(),
) -> Accounting:
    """`published`: request_id → tenant_id; `policies`: tenant_id → fallback policy ("none" if unconfigured);
    `healthy`: request ids whose provider fate lets them succeed within their attempts."""
    seen: dict[str, list[Observation]] = defaultdict(list)
    result = Accounting(len(published))
    for obs in observations:
        if obs.request_id is None or obs.request_id not in published:
            result.unknown += 1
            continue
        seen[obs.request_id].append(obs)
        if not obs.correlation_ok:
            result.bad_correlation += 1
    for request_id, tenant_id in published.items():
        found = seen.get(request_id, [])
        terminal = [o for o in found if o.sink in ("reply", "cloud")] or [o for o in found if o.sink == "dead"]
        if not terminal:
            result.lost.append(request_id)
            continue
        _count_duplicates(result, terminal, found)
        # The authoritative history (README, delivery guarantees): the copies of the highest rank.
        top = max(o.rank for o in terminal)
        authoritative = [o for o in terminal if o.rank == top]
        dead = [o for o in found if o.sink == "dead" and o.rank == top]
        outcomes = {o.outcome for o in authoritative}
        replies_ok = any(o.outcome[:2] == ("reply", "ok") for o in authoritative)
        # A dead letter belongs with a failed/expired reply, never with an answer or a reroute.
        if len(outcomes) > 1 or (dead and (replies_ok or any(o.sink == "cloud" for o in authoritative))):
            result.inconsistent.append(request_id)
        if request_id in healthy and any(o.error_code == "circuit_open" for o in authoritative):
            result.circuit_failed_healthy.append(request_id)
        if policies.get(tenant_id) in BYOC_ONLY and any(o.sink == "cloud" for o in found):
            result.cloud_leaks.append(request_id)
        first = authoritative[0]
        label = " ".join(first.outcome[:2]) if first.sink != "reply" else first.outcome[1]
        if first.sink == "reply" and first.error_code != "-":
            label += f" ({first.error_code})"
        if dead:
            label += " + dead letter"
        result.by_tenant.setdefault(tenant_id, Counter())[label] += 1
    return result


def _count_duplicates(result: Accounting, terminal: list[Observation], found: list[Observation]) -> None:
    """Classify a request seen more than once: identical, explained by the rank rule, or unexplained."""
    dead = [o for o in found if o.sink == "dead"]
    extra = len(terminal) - 1 + (max(0, len(dead) - 1) if terminal[0].sink != "dead" else 0)
    if not extra:
        return
    result.duplicate_requests += 1
    result.duplicate_deliveries += extra
    outcomes = {o.outcome for o in terminal}
    if len(outcomes) == 1:
        result.duplicates_identical += 1
        if len({o.error_code for o in terminal}) > 1:
            result.duplicates_other_error += 1
        return
    top = max(o.rank for o in terminal)
    if len({o.outcome for o in terminal if o.rank == top}) == 1:
        result.duplicates_explained += 1
    else:
        result.duplicates_differing += 1


def canary_hits(canaries: Iterable[str], blobs: Iterable[bytes]) -> dict[str, int]:
    """How often each secret value occurs in any of the blobs (logs, bodies, headers, metrics)."""
    values = [c.encode() for c in canaries]
    hits = dict.fromkeys((v.decode() for v in values), 0)
    for blob in blobs:
        for value in values:
            hits[value.decode()] += blob.count(value)
    return hits
