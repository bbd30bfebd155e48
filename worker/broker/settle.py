"""Settling a delivery: publish what the outcome requires, wait for every confirm, then ack. Nothing else acks."""

import asyncio
import contextlib
import uuid
from datetime import UTC, datetime
from typing import Any, Final

import structlog
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage
from aio_pika.exceptions import AMQPError, ChannelInvalidStateError, ChannelNotFoundEntity, DeliveryError, PublishError

from contracts import ErrorInfo, Header, InferenceReply, Topology
from worker.broker.acks import ACK_TIMEOUT_S, Acknowledger
from worker.broker.copies import copy_body, copy_properties, lineage_headers, publisher_headers
from worker.broker.header_trust import HeaderTrust
from worker.broker.headers import read_count
from worker.broker.limits import DEAD_LETTER_BODY_PREFIX_BYTES, ERROR_MESSAGE_LIMIT, MAX_BODY_BYTES, bounded_headers
from worker.broker.publish import PERSISTENT, Properties, publish
from worker.handling import history
from worker.handling.outcome import (
    DeadLetter,
    DeadLetterReason,
    Defer,
    MalformedCode,
    Outcome,
    Reply,
    RequestIds,
    Reroute,
    Retry,
    SettleResult,
)
from worker.redaction import redact_text
from worker.tracing import NO_TRACING, Tracing

log = structlog.get_logger("worker.broker.settle")
audit = structlog.get_logger("worker.audit")

PUBLISH_TIMEOUT_S = 30.0
SETTLE_SPAN: Final = {"messaging.system": "rabbitmq", "messaging.operation.type": "settle"}
# A reply the broker refuses (a nack: the caller's reply queue is full, `x-overflow: reject-publish`) is published
# again after each of these waits. Put back on the queue instead, the request would be answered anew at each
# delivery, its provider called (and paid for) every time until the delivery limit.
REFUSED_REPLY_WAITS_S: Final = (0.1, 0.2, 0.4, 0.8, 1.6, 3.2)


class ReplyRefused(Exception):
    """The broker refused every publish of a reply."""


def _now() -> str:
    return datetime.now(UTC).isoformat()


class Settler:
    """Publishes replies, retries, reroutes and dead letters with confirms, then acks the delivery."""

    def __init__(
        self,
        channel: AbstractChannel,
        topology: Topology,
        atlas_cloud_exchange: str,
        *,
        worker_user: str | None,
        trust: HeaderTrust | None = None,
        max_body_bytes: int = MAX_BODY_BYTES,
        tracing: Tracing = NO_TRACING,
    ) -> None:
        self._channel = channel
        # The AMQP user `channel` is authenticated as: every copy carries it as `user_id` (see `copies`).
        self.worker_user = worker_user
        self._tracing = tracing
        self._topology = topology
        self._atlas_cloud = atlas_cloud_exchange
        self.trust = trust or HeaderTrust(topology)
        self._max_body_bytes = max_body_bytes
        self._acks = Acknowledger()

    async def settle(self, delivery: AbstractIncomingMessage, outcome: Outcome, ids: RequestIds) -> SettleResult:
        """Carry out the outcome; returns what was done (for logs and metrics). Raises if anything failed
        to be confirmed, in which case the delivery is not acked and the broker will deliver it again."""
        with self._tracing.span("settle", SETTLE_SPAN):
            done = await self._settle(delivery, outcome, ids)
            self._tracing.annotate({"atlas.settle.result": done.value})
            return done

    async def _settle(self, delivery: AbstractIncomingMessage, outcome: Outcome, ids: RequestIds) -> SettleResult:
        # A delivery whose channel closed (the connection dropped while its provider call ran) can no longer
        # be acked: the broker has already queued it again. Publishing its outcome now would answer twice.
        if delivery.channel.is_closed:  # the property itself raises ChannelInvalidStateError once it is closed
            raise ChannelInvalidStateError("the delivery's channel closed while it was handled")
        match outcome:
            case Reply(reply=reply, dead_letter=dead):
                done = await self._reply_and_dead_letter(delivery, reply, dead, ids)
            case Retry():
                done = await self._retry(delivery, outcome, ids)
            case Defer():
                believed = self.trust.believed(delivery.headers, ids.request_id)
                headers = {
                    Header.DEFERRALS: read_count(believed, Header.DEFERRALS) + 1,
                    **lineage_headers(delivery, believed, put_back=True),
                }
                await self._publish_copy(delivery, ids, self._topology.retry, "0", headers)
                done = SettleResult.DEFERRED
            case Reroute():
                done = await self._reroute(delivery, outcome, ids)
        self._acks.ack(delivery)
        return done

    async def _retry(self, delivery: AbstractIncomingMessage, outcome: Retry, ids: RequestIds) -> SettleResult:
        believed = self.trust.believed(delivery.headers, ids.request_id)
        headers: dict[str, Any] = {
            Header.ATTEMPTS: outcome.attempts,
            Header.RETRY_LEVEL: outcome.level,
            **lineage_headers(delivery, believed, put_back=True),
        }
        if outcome.refused_by_circuit:
            # No provider call was made: the last real error stays on the message (believed headers travel on
            # in `_publish_copy`); the wait starts the patience.
            first = believed.get(Header.FIRST_FAILURE_AT)
            headers[Header.FIRST_FAILURE_AT] = first if isinstance(first, str) else _now()
            headers[Header.CIRCUIT_WAITS] = read_count(believed, Header.CIRCUIT_WAITS) + 1
        else:
            headers |= self._failure_headers(delivery, ids, outcome.error, outcome.provider_kind)
        if outcome.history:
            headers[Header.HISTORY] = history.encode(outcome.history)
        await self._publish_copy(delivery, ids, self._topology.retry, str(outcome.level), headers)
        return SettleResult.CIRCUIT_WAIT if outcome.refused_by_circuit else SettleResult.RETRIED

    async def return_to_queue(self, delivery: AbstractIncomingMessage) -> None:
        """Give an unsettled delivery back to the broker (shutdown, or a publish that was not confirmed)."""
        # If the channel is gone, the broker requeues unacked deliveries itself.
        with contextlib.suppress(
            AMQPError, ChannelInvalidStateError, ConnectionError, TimeoutError, asyncio.CancelledError
        ):
            async with asyncio.timeout(ACK_TIMEOUT_S):  # a write queue that never frees up (see `acks`)
                await asyncio.shield(delivery.nack(requeue=True))
        # Only once the nack is on the wire: a `multiple` ack sent before it would take the delivery with it.
        self._acks.returned(delivery)

    async def flush_acks(self) -> None:
        await self._acks.flush()

    async def _reply_and_dead_letter(
        self,
        delivery: AbstractIncomingMessage,
        reply: InferenceReply | None,
        dead: DeadLetter | None,
        ids: RequestIds,
    ) -> SettleResult:
        lost: PublishError | ReplyRefused | None = None
        if reply is not None and dead is None:
            # The common case, awaited directly: no gather, no extra task.
            try:
                await self._publish_reply(delivery, reply)
            except (PublishError, ReplyRefused) as exc:
                lost = exc
        else:
            publishes = []
            if reply is not None:
                publishes.append(self._publish_reply(delivery, reply))
            if dead is not None:
                publishes.append(self._dead_letter(delivery, dead, ids))
            results = await asyncio.gather(*publishes, return_exceptions=True)
            if reply is not None and isinstance(results[0], PublishError | ReplyRefused):
                lost = results[0]
            for result in results:
                if isinstance(result, BaseException) and result is not lost:
                    raise result
        if lost is not None:
            log.warning("reply_unroutable", reply_to=delivery.reply_to, refused=isinstance(lost, ReplyRefused))
            if dead is None:
                if isinstance(lost, ReplyRefused):
                    error = ErrorInfo(code="reply_rejected", message=str(lost))
                else:
                    error = ErrorInfo(
                        code="reply_unroutable", message=f"no queue named {delivery.reply_to!r} to reply to"
                    )
                attempts = reply.provenance.attempts if reply else 0
                await self._dead_letter(
                    delivery, DeadLetter(DeadLetterReason.REPLY_UNROUTABLE, error, attempts=attempts), ids
                )
            return SettleResult.DEAD_LETTERED
        if dead is None:
            return SettleResult.REPLIED
        # Count what happened: a message with no one to answer (reply None) was only dead-lettered.
        return SettleResult.REPLIED_AND_DEAD_LETTERED if reply is not None else SettleResult.DEAD_LETTERED

    async def _publish_reply(self, delivery: AbstractIncomingMessage, reply: InferenceReply) -> None:
        if reply.error is not None:  # the last look before it leaves: error messages may quote anything
            reply = reply.model_copy(update={"error": _masked(reply.error)})
        # Straight to JSON bytes: about half the cost of dumping to a dict and encoding that (same JSON).
        body = reply.__pydantic_serializer__.to_json(reply, exclude_none=True)
        headers: dict[str, Any] = {
            Header.REQUEST_ID: reply.request_id,
            Header.TENANT_ID: reply.tenant_id,
            Header.TASK: reply.task,
            "atlas-status": reply.status.value,
        }
        if delivery.reply_to:
            exchange, routing_key = "", delivery.reply_to
        else:
            exchange, routing_key = self._topology.replies, Topology.reply_routing_key(reply.tenant_id, reply.task)
        with self._tracing.publish(exchange, routing_key, headers, delivery.headers):
            properties = Properties(
                content_type="application/json",
                correlation_id=delivery.correlation_id or reply.request_id,
                message_id=f"{reply.request_id}:reply" if reply.request_id else None,
                delivery_mode=PERSISTENT,
                priority=0,
                timestamp=datetime.now(UTC),
                headers=headers,
            )
            for wait_s in (*REFUSED_REPLY_WAITS_S, None):
                try:
                    await publish(self._channel, exchange, routing_key, body, properties, PUBLISH_TIMEOUT_S)
                    return
                except PublishError:  # returned, no queue to route it to: a DeliveryError too, but not a refusal
                    raise
                except DeliveryError as exc:
                    if wait_s is None:
                        waited = sum(REFUSED_REPLY_WAITS_S)
                        raise ReplyRefused(f"the broker refused the reply to {routing_key!r} for {waited:g} s") from exc
                    log.warning("reply_refused", reply_to=routing_key, exchange=exchange, retry_in_s=wait_s)
                    await asyncio.sleep(wait_s)

    async def _dead_letter(self, delivery: AbstractIncomingMessage, dead: DeadLetter, ids: RequestIds) -> None:
        headers = {
            Header.REASON: dead.reason,
            Header.ATTEMPTS: dead.attempts,
            Header.DEAD_LETTERED_AT: _now(),
            # The worker's, never the publisher's message_id: `dlq` acts on exactly the dead letter it names.
            Header.DEAD_LETTER_ID: uuid.uuid4().hex,
            **self._failure_headers(delivery, ids, dead.error, dead.provider_kind),
            **lineage_headers(delivery, self.trust.believed(delivery.headers, ids.request_id), put_back=False),
        }
        last = dead.error.last_provider_error
        if last is not None:
            headers[Header.LAST_PROVIDER_ERROR_CODE] = last.code
            headers[Header.LAST_PROVIDER_ERROR_MESSAGE] = redact_text(last.message)[:ERROR_MESSAGE_LIMIT]
        if dead.history:  # else the history it arrived with (vouched for) travels on
            headers[Header.HISTORY] = history.encode(dead.history)
        # A body refused as too large (in bytes or entries) is not read in full again: the copy keeps a prefix.
        too_large = dead.error.code == MalformedCode.BODY_TOO_LARGE
        await self._publish_copy(delivery, ids, self._topology.dead, "", headers, dead_letter=True, prefix=too_large)

    async def _reroute(self, delivery: AbstractIncomingMessage, outcome: Reroute, ids: RequestIds) -> SettleResult:
        headers: dict[str, Any] = {
            Header.REASON: outcome.reason,
            Header.REROUTED_FROM_TENANT: ids.tenant_id,
            Header.REROUTED_AT: _now(),
        }
        if outcome.error is not None:
            headers |= self._failure_headers(delivery, ids, outcome.error, outcome.provider_kind)
            headers[Header.ATTEMPTS] = outcome.attempts
        try:
            await self._publish_copy(
                delivery, ids, self._atlas_cloud, Topology.reply_routing_key(ids.tenant_id, ids.task), headers
            )
        except (PublishError, ChannelNotFoundEntity) as exc:
            if isinstance(exc, ChannelNotFoundEntity) and f"no exchange '{self._atlas_cloud}'" not in str(exc):
                raise  # another publish's 404 closed the channel under this one: not this reroute's doing
            # Unroutable: returned (nothing bound), or the exchange is gone (the broker closed the channel over
            # it). Put back, it would close the publishing channel at each delivery until its delivery limit.
            log.error("reroute_unroutable", exchange=self._atlas_cloud)
            await self._dead_letter(
                delivery,
                DeadLetter(
                    DeadLetterReason.REROUTE_UNROUTABLE,
                    ErrorInfo(
                        code="reroute_unroutable", message=f"nothing is bound to {self._atlas_cloud!r} for this request"
                    ),
                    provider_kind=outcome.provider_kind,
                    attempts=outcome.attempts,
                ),
                ids,
            )
            return SettleResult.DEAD_LETTERED
        audit.warning(
            "data_left_network",
            tenant_id=ids.tenant_id,
            request_id=ids.request_id,
            reason=outcome.reason,
            exchange=self._atlas_cloud,
            at=headers[Header.REROUTED_AT],
        )
        return SettleResult.REROUTED

    def _failure_headers(
        self, delivery: AbstractIncomingMessage, ids: RequestIds, error: ErrorInfo, provider_kind: str | None
    ) -> dict[str, Any]:
        headers = self.trust.believed(delivery.headers, ids.request_id)  # history only from the worker itself
        first = headers.get(Header.FIRST_FAILURE_AT)
        now = _now()
        result: dict[str, Any] = {
            Header.ERROR_CODE: error.code,
            Header.ERROR_MESSAGE: redact_text(error.message)[:ERROR_MESSAGE_LIMIT],
            Header.FIRST_FAILURE_AT: first if isinstance(first, str) else now,
            Header.LAST_FAILURE_AT: now,
            Header.ORIGINAL_EXCHANGE: headers.get(Header.ORIGINAL_EXCHANGE, delivery.exchange or ""),
            Header.ORIGINAL_ROUTING_KEY: headers.get(Header.ORIGINAL_ROUTING_KEY, delivery.routing_key or ""),
        }
        if error.error_class:
            result[Header.ERROR_CLASS] = error.error_class
        if provider_kind:
            result[Header.PROVIDER_KIND] = provider_kind
        return result

    async def _publish_copy(
        self,
        delivery: AbstractIncomingMessage,
        ids: RequestIds,
        exchange_name: str,
        routing_key: str,
        extra: dict[str, Any],
        *,
        dead_letter: bool = False,
        prefix: bool = False,
    ) -> None:
        """Republish the original body and properties with extra headers. The body is otherwise never changed,
        only cut to a prefix when it is over the size limit or `prefix` asks (and masked in a dead letter);
        publisher headers are left off when they would not fit."""
        limit = DEAD_LETTER_BODY_PREFIX_BYTES if prefix else self._max_body_bytes  # a shorter body stays whole
        body, about_body = await copy_body(delivery.body, limit, dead_letter=dead_letter)
        identity = {Header.REQUEST_ID: ids.request_id, Header.TENANT_ID: ids.tenant_id, Header.TASK: ids.task}
        ours = {
            **self.trust.believed(delivery.headers, ids.request_id),
            **{k: v for k, v in identity.items() if v is not None},
            **extra,
            **about_body,
        }
        ours |= self.trust.signature(ids.request_id, ours)
        headers = bounded_headers(publisher_headers(delivery.headers), ours)
        with self._tracing.publish(exchange_name, routing_key, headers, delivery.headers):
            properties = copy_properties(delivery, headers, user_id=self.worker_user)
            await publish(self._channel, exchange_name, routing_key, body, properties, PUBLISH_TIMEOUT_S)


def _masked(error: ErrorInfo) -> ErrorInfo:
    update: dict[str, Any] = {"message": redact_text(error.message)}
    if error.last_provider_error is not None:
        last = error.last_provider_error
        update["last_provider_error"] = last.model_copy(update={"message": redact_text(last.message)})
    return error.model_copy(update=update)
