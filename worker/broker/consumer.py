"""The consumer loop: decode a delivery, hand it to the handler, settle the outcome (never cancelled), log it."""

import asyncio
import time
from collections.abc import Callable
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import structlog
from aio_pika.abc import AbstractIncomingMessage, AbstractQueue
from aio_pika.exceptions import AMQPError, ChannelInvalidStateError
from pydantic import ValidationError

from contracts import ErrorInfo, Header, InferenceRequest, Status
from worker.broker.claimed_ids import leading_ids, parsed_ids
from worker.broker.headers import first_failure_at, last_error, read_count, read_history
from worker.broker.limits import MAX_BODY_BYTES, MAX_BODY_ENTRIES
from worker.broker.publishers import PublisherRules
from worker.broker.settle import Settler
from worker.handling import replies
from worker.handling.outcome import (
    DeadLetter,
    DeadLetterReason,
    DeliveryContext,
    Malformed,
    MalformedCode,
    Outcome,
    Reply,
    RequestIds,
    Retry,
    SettleResult,
)
from worker.handling.route import Router
from worker.json_entries import exceeds
from worker.tracing import NO_TRACING, Tracing

log = structlog.get_logger("worker.broker.consumer")

__all__ = ["MAX_BODY_BYTES", "Consumer", "Malformed", "Settled", "decode"]


@dataclass(frozen=True, slots=True)
class Settled:
    """One delivery's end, for metrics and tests."""

    ids: RequestIds
    outcome: Outcome
    done: SettleResult
    duration_ms: float


async def decode(
    body: bytes,
    max_body_bytes: int = MAX_BODY_BYTES,
    max_entries: int = MAX_BODY_ENTRIES,
    counter: Executor | None = None,
) -> InferenceRequest | Malformed:
    """The request in `body`, or why there is none. A body over either bound is refused before it is read; its
    entries, when a quick look cannot rule out too many, are counted on `counter` (the loop's default if None)."""
    if len(body) > max_body_bytes:
        return Malformed(
            MalformedCode.BODY_TOO_LARGE,
            f"body is {len(body)} bytes; the limit is {max_body_bytes}",
            *leading_ids(body),
        )
    if await exceeds(body, max_entries, counter):
        return Malformed(
            MalformedCode.BODY_TOO_LARGE,
            f"body holds more than {max_entries:,} entries (object members and array elements); the limit is "
            f"{max_entries:,}",
            *leading_ids(body),
        )
    return validate(body)


def validate(body: bytes) -> InferenceRequest | Malformed:
    try:
        return InferenceRequest.model_validate_json(body)
    except ValidationError as exc:
        errors = exc.errors(include_url=False, include_context=False, include_input=False)
        if errors and errors[0]["type"] == "json_invalid":
            return Malformed(MalformedCode.INVALID_JSON, "body is not valid JSON", *leading_ids(body))
        partial = parsed_ids(body)
        first = errors[0]
        where = ".".join(map(str, first["loc"])) or "(body)"
        code = MalformedCode.UNKNOWN_TASK if first["loc"] == ("task",) else MalformedCode.INVALID_REQUEST
        detail = f"{where}: {first['msg']}" + (f" (+{len(errors) - 1} more)" if len(errors) > 1 else "")
        return Malformed(code, detail[:500], *partial)


def _ids(decoded: InferenceRequest | Malformed) -> RequestIds:
    if isinstance(decoded, InferenceRequest):
        return RequestIds(decoded.request_id, decoded.tenant_id, decoded.task.value)
    return RequestIds(decoded.request_id, decoded.tenant_id, decoded.task)


@dataclass(frozen=True, slots=True)
class Received:
    """When a delivery reached the worker: the start of its `timings.total_ms` and `received_at`."""

    monotonic: float
    at: datetime

    @classmethod
    def now(cls) -> "Received":
        return cls(time.monotonic(), datetime.now(UTC))


def delivery_context(message: AbstractIncomingMessage, believed: dict[str, Any], received: Received) -> DeliveryContext:
    """What the delivery says beyond its body, from the worker's own headers that `HeaderTrust` vouches for."""
    if not believed:  # a first delivery (or none of its headers vouched for): every reader below finds nothing
        redelivered = int(bool(message.redelivered))
        return DeliveryContext(
            0, received.at, received.monotonic, redeliveries=redelivered, body_bytes=len(message.body)
        )
    return DeliveryContext(
        attempts=read_count(believed, Header.ATTEMPTS),
        received_at=received.at,
        received_monotonic=received.monotonic,
        first_failure_at=first_failure_at(believed),
        last_error=last_error(believed),
        settle_seq=read_count(believed, Header.SETTLE_SEQ),
        redeliveries=read_count(believed, Header.REDELIVERIES) + bool(message.redelivered),
        history=read_history(believed),
        body_bytes=len(message.body),
    )


class Consumer:
    """Consumes `{ns}.requests` with many deliveries in flight; each is settled exactly once or returned."""

    def __init__(
        self,
        queue: AbstractQueue,
        handler: Router,
        settler: Settler,
        *,
        on_settled: Callable[[Settled], None] | None = None,
        publishers: PublisherRules | None = None,
        max_body_bytes: int = MAX_BODY_BYTES,
        max_body_entries: int = MAX_BODY_ENTRIES,
        tracing: Tracing = NO_TRACING,
    ) -> None:
        self._queue = queue
        self._tracing = tracing
        self._handler = handler
        self._settler = settler
        self._on_settled = on_settled
        self._publishers = publishers or PublisherRules()
        self._max_body_bytes = max_body_bytes
        self._max_body_entries = max_body_entries
        # One thread counts large bodies' entries, one body at a time: however many arrive, the event loop
        # competes with one counting thread for the GIL, and no other work queues behind them on a shared pool.
        self._entry_counter = ThreadPoolExecutor(max_workers=1, thread_name_prefix="atlas-body-entries")
        self._tag: str | None = None
        # Handling, cancellable on shutdown; each with its request id once decoded (None if it has none).
        self._working: dict[asyncio.Task[None], str | None] = {}
        # Settling, never cancelled: a delivery's task moves here from `_working` once its outcome is known.
        self._settling: set[asyncio.Task[None]] = set()

    @property
    def in_flight(self) -> int:
        return len(self._working) + len(self._settling)

    @property
    def consuming(self) -> bool:
        return self._tag is not None

    async def start(self) -> None:
        self._tag = await self._queue.consume(self._on_delivery)

    async def _on_delivery(self, message: AbstractIncomingMessage) -> None:
        # The clock starts here, not when the task below first runs: waiting for the loop to get to it (behind
        # other deliveries, replies and acks) is time the request spends in the worker too.
        received = Received.now()
        # Handled in a task of our own, so a broker channel closing does not cancel a provider call midway.
        task = asyncio.create_task(self._process(message, received))
        self._working[task] = None
        task.add_done_callback(self._forget)

    def _forget(self, task: "asyncio.Task[None]") -> None:
        self._working.pop(task, None)
        self._settling.discard(task)

    async def _process(self, message: AbstractIncomingMessage, received: Received) -> None:
        with self._tracing.delivery(message, self._queue.name):
            await self._process_in_span(message, received)

    async def _process_in_span(self, message: AbstractIncomingMessage, received: Received) -> None:
        this = asyncio.current_task()
        try:
            decoded, ids, ctx = await self._decoded(message, received)
            if isinstance(decoded, InferenceRequest):
                outcome = await self._handle(decoded, ctx)
            else:
                outcome = _rejected(decoded, ctx, reply=self._may_reply(message))
        except asyncio.CancelledError:  # shutdown: counting a large body's entries or the handling was cut short
            await self._settler.return_to_queue(message)
            raise
        except Exception:  # reading it failed (the handler's own errors become replies): never left unsettled
            log.exception("delivery_failed")
            await self._settler.return_to_queue(message)
            return
        if this is not None:
            # Settled in this same task, not one of its own: from here on shutdown waits for it, never cancels it.
            self._working.pop(this, None)
            self._settling.add(this)
        try:
            done = await self._settler.settle(message, outcome, ids)
        except (AMQPError, ChannelInvalidStateError, ConnectionError, TimeoutError) as exc:
            # Not confirmed, so not acked: the broker delivers it again (at-least-once).
            log.warning("settle_failed", error=f"{type(exc).__name__}: {exc}")
            await self._settler.return_to_queue(message)
            return
        except Exception:
            log.exception("settle_failed")
            await self._settler.return_to_queue(message)
            return
        self._report(Settled(ids, outcome, done, (time.monotonic() - received.monotonic) * 1000))

    async def _decoded(
        self, message: AbstractIncomingMessage, received: Received
    ) -> tuple[InferenceRequest | Malformed, RequestIds, DeliveryContext]:
        """The delivery's request (or why there is none), its ids and what its headers say; logs and spans learn
        the ids here."""
        decoded = await decode(message.body, self._max_body_bytes, self._max_body_entries, self._entry_counter)
        decoded = self._admitted(decoded, message)
        request = decoded if isinstance(decoded, InferenceRequest) else None
        believed = self._settler.trust.believed(message.headers, request.request_id if request else None)
        ctx = delivery_context(message, believed, received)
        ids = _ids(decoded)
        this = asyncio.current_task()
        if this is not None and this in self._working:
            self._working[this] = ids.request_id
        structlog.contextvars.bind_contextvars(
            request_id=ids.request_id, tenant_id=ids.tenant_id, task=ids.task, attempt=ctx.attempts + 1
        )
        self._tracing.annotate_delivery(ids, ctx.attempts + 1)
        return decoded, ids, ctx

    def _admitted(
        self, decoded: InferenceRequest | Malformed, message: AbstractIncomingMessage
    ) -> InferenceRequest | Malformed:
        """The request, unless the operator's publisher rules refuse who sent it, for whom, or where to reply.
        What the worker published itself (a retry, a deferral, a replay) carries the user the settler publishes
        as, so the copies it makes come back in as their originals did."""
        if not self._publishers.active:
            return decoded
        if isinstance(decoded, Malformed):  # not a request: who sent it, and for the tenant the body claims
            refused = self._publishers.sender_refusal(
                message.user_id, decoded.tenant_id, worker_user=self._settler.worker_user
            )
            if refused is None:
                return decoded
            log.warning("publisher_refused", user_id=message.user_id, reason=refused)
            return Malformed(
                MalformedCode.PUBLISHER_REFUSED, refused, decoded.request_id, decoded.tenant_id, decoded.task
            )
        refusal = self._publishers.refusal(
            message.user_id, decoded.tenant_id, message.reply_to, worker_user=self._settler.worker_user
        )
        if refusal is None:
            return decoded
        log.warning("publisher_refused", user_id=message.user_id, reason=refusal)
        return Malformed(
            MalformedCode.PUBLISHER_REFUSED, refusal, decoded.request_id, decoded.tenant_id, decoded.task.value
        )

    def _may_reply(self, message: AbstractIncomingMessage) -> bool:
        return bool(message.reply_to) and self._publishers.reply_to_allowed(message.reply_to or "")

    async def _handle(self, request: InferenceRequest, ctx: DeliveryContext) -> Outcome:
        try:
            return await self._handler.handle(request, ctx)
        except Exception as exc:  # CancelledError is not an Exception: it still reaches the caller
            # A bug must not become a crash loop: the request is dead-lettered with the reason.
            log.exception("handler_crashed")
            error = ErrorInfo(code="internal_error", message=f"worker error: {type(exc).__name__}")
            reply = replies.reply(replies.ids_of(request), ctx, Status.FAILED, error=error)
            return Reply(reply, DeadLetter(DeadLetterReason.INTERNAL_ERROR, error, attempts=ctx.attempts))

    def _report(self, settled: Settled) -> None:
        outcome = settled.outcome
        fields: dict[str, Any] = {"outcome": settled.done, "duration_ms": round(settled.duration_ms, 2)}
        if isinstance(outcome, Reply) and outcome.reply is not None:
            reply = outcome.reply
            fields |= {
                "status": reply.status.value,
                "provider": reply.provenance.provider_kind,
                "provider_ms": reply.timings.provider_ms,
            }
            if reply.error:
                fields["error_code"] = reply.error.code
        elif isinstance(outcome, Reply) and outcome.dead_letter:
            fields |= {"status": Status.REJECTED.value, "error_code": outcome.dead_letter.error.code}
        elif isinstance(outcome, Retry):
            due = datetime.now(UTC) + timedelta(seconds=outcome.delay_s)
            fields |= {
                "error_code": outcome.error.code,
                "retry_level": outcome.level,
                "next_attempt_at": due.isoformat(),
            }
        log.info("request_settled", **fields)
        if self._on_settled is not None:
            self._on_settled(settled)

    async def stop_consuming(self) -> None:
        """Take no new deliveries (those already prefetched still arrive and are handled)."""
        if self._tag is not None:
            tag, self._tag = self._tag, None
            try:
                await self._queue.cancel(tag)
            except (AMQPError, ChannelInvalidStateError, ConnectionError) as exc:
                log.warning("consumer_cancel_failed", error=str(exc))

    async def drain(self, grace_s: float, *, force: asyncio.Event | None = None) -> list[str | None]:
        """Stop consuming, let in-flight work finish for `grace_s` (or until `force` is set), return the rest
        to the queue. Returns the request ids of the deliveries returned unfinished (None: not readable)."""
        await self.stop_consuming()
        if self._working:
            await _wait_unless(set(self._working), grace_s, force)
        unfinished = {t: request_id for t, request_id in self._working.items() if not t.done()}
        for task in unfinished:
            task.cancel()
        if unfinished:
            await asyncio.wait(unfinished)
        if self._settling:
            await asyncio.wait(set(self._settling))
        await self._settler.flush_acks()
        self._entry_counter.shutdown(wait=False, cancel_futures=True)
        return list(unfinished.values())


async def _wait_unless(tasks: set["asyncio.Task[None]"], timeout_s: float, force: asyncio.Event | None) -> None:
    """Until every task is done, `timeout_s` passes, or `force` is set."""
    if force is None:
        await asyncio.wait(tasks, timeout=timeout_s)
        return
    everything = asyncio.create_task(asyncio.wait(tasks))  # cancelling this wait leaves the tasks running
    forced = asyncio.create_task(force.wait())
    try:
        await asyncio.wait({everything, forced}, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
    finally:
        everything.cancel()
        forced.cancel()


def _rejected(bad: Malformed, ctx: DeliveryContext, *, reply: bool) -> Reply:
    error = ErrorInfo(code=bad.code, message=bad.message)
    rejection = replies.rejected(_ids(bad), ctx, error) if reply else None
    refused = bad.code is MalformedCode.PUBLISHER_REFUSED
    reason = DeadLetterReason.PUBLISHER_REFUSED if refused else DeadLetterReason.MALFORMED
    return Reply(rejection, DeadLetter(reason, error, attempts=ctx.attempts))
