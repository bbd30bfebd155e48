"""Dead-letter commands: list, show, replay and purge the messages parked on `{ns}.dead`.

Browsing is non-destructive: messages are fetched with `basic.get` and left unacknowledged, and closing the
channel returns them to the queue. Replay publishes a copy to `{ns}.requests` with publisher confirms and
acks the dead letter only once the copy is confirmed, so a crash mid-replay can duplicate, never lose.
"""

import asyncio
import hashlib
import json
import sys
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any, Final, TextIO

import orjson
from aio_pika.abc import AbstractChannel, AbstractConnection, AbstractIncomingMessage, AbstractQueue

from contracts import REQUEST_ROUTING_KEY, Header, Task, Topology
from worker.broker.claimed_ids import parsed_ids
from worker.broker.copies import copy_of, replay_headers
from worker.broker.header_trust import VOUCHED, HeaderTrust
from worker.broker.headers import latest_death, read_count, read_history, read_text, read_time
from worker.handling.history import History
from worker.handling.outcome import DEAD_LETTER_REASONS, DeadLetterReason
from worker.redaction import redact, redact_text

PUBLISH_TIMEOUT_S = 30.0
REQUEUE_POLLS, REQUEUE_POLL_S = 50, 0.02  # up to a second for a browse's messages to be back in the queue
# Reasons the broker itself records in `x-death` when it dead-letters a message.
BROKER_REASONS: Final = frozenset({"delivery_limit", "rejected", "expired", "maxlen"})
KNOWN_REASONS: Final = DEAD_LETTER_REASONS | BROKER_REASONS
KNOWN_TASKS: Final = frozenset(task.value for task in Task)
CANDIDATES_SHOWN: Final = 10
# A replay is published as the replaying user (the worker's, usually), which the publisher rules admit: a request
# they refused would run without the check that refused it. Replayed only when the operator names it.
HELD_BACK_FROM_REPLAY: Final = frozenset({DeadLetterReason.PUBLISHER_REFUSED.value})


def filter_problem(task: str | None, reason: str | None) -> str | None:
    """One line naming the known values, when a `--task` or `--reason` filter could match nothing."""
    if task is not None and task not in KNOWN_TASKS:
        return f"unknown --task {task!r}; known: {', '.join(sorted(KNOWN_TASKS))}"
    if reason is not None and reason not in KNOWN_REASONS:
        return f"unknown --reason {reason!r}; known: {', '.join(sorted(KNOWN_REASONS))}"
    return None


class Unresolved(Exception):
    """A name on the command line that names no dead letter, or more than one."""


@dataclass(frozen=True)
class DeadLetterView:
    """One dead letter as an operator sees it."""

    id: str
    request_id: str | None
    tenant: str | None
    task: str | None
    reason: str
    error_code: str | None
    attempts: int
    dead_lettered_at: datetime | None
    headers: dict[str, Any]
    properties: dict[str, Any]
    body: bytes
    # The worker's story of the request; none on a message the broker dead-lettered, whose headers are the
    # publisher's and may be forged.
    history: History = ()

    def age_s(self, now: datetime) -> float | None:
        return (now - self.dead_lettered_at).total_seconds() if self.dead_lettered_at else None


def resolve(views: Sequence[DeadLetterView], name: str) -> DeadLetterView:
    """The one dead letter `name` names: its id, its request id, or a unique prefix of its id. A name that
    fits several is refused with the candidates, so an operator never acts on a dead letter by accident."""
    for matches in (
        [v for v in views if v.id == name],
        [v for v in views if v.request_id == name],
        [v for v in views if v.id.startswith(name)] if name else [],
    ):
        if len(matches) == 1:
            return matches[0]
        if matches:
            listed = ", ".join(v.id for v in matches[:CANDIDATES_SHOWN])
            more = f" and {len(matches) - CANDIDATES_SHOWN} more" if len(matches) > CANDIDATES_SHOWN else ""
            raise Unresolved(f"{name!r} names {len(matches)} dead letters: {listed}{more}; give a longer id")
    raise Unresolved(f"no dead letter with id or request id {name!r}")


@dataclass(frozen=True)
class Selection:
    """Which dead letters a command applies to: by id, and/or by tenant, task, reason."""

    ids: frozenset[str] = frozenset()
    tenant: str | None = None
    task: str | None = None
    reason: str | None = None
    everything: bool = False

    @property
    def is_empty(self) -> bool:
        return not (self.ids or self.tenant or self.task or self.reason or self.everything)

    def names(self, view: DeadLetterView) -> bool:
        """The operator asked for this dead letter in so many words: by its id, or by its reason."""
        return view.id in self.ids or self.reason == view.reason

    def matches(self, view: DeadLetterView) -> bool:
        return (
            (not self.ids or view.id in self.ids)
            and (self.tenant is None or view.tenant == self.tenant)
            and (self.task is None or view.task == self.task)
            and (self.reason is None or view.reason == self.reason)
        )


def _body_fields(body: bytes) -> dict[str, Any]:
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        return {}
    return data if isinstance(data, dict) else {}


def _parked_by_worker(headers: dict[str, Any], last_death: Mapping[str, Any]) -> bool:
    """A message the broker dead-lettered itself (its latest death is not a retry level's expiry) kept the
    publisher's headers, so an `atlas-` header there may be forged."""
    own = read_text(headers.get(Header.DEAD_LETTER_ID))
    return bool(own) and (not last_death or read_text(last_death.get("reason")) == "expired")


def _identity(headers: dict[str, Any], properties: dict[str, Any], body: bytes, last_death: Mapping[str, Any]) -> str:
    """The worker's `atlas-dead-letter-id` when the worker parked the message; otherwise the message is
    named by a digest of everything it carries."""
    own = read_text(headers.get(Header.DEAD_LETTER_ID))
    if own and _parked_by_worker(headers, last_death):
        return own
    carried = orjson.dumps([_plain(headers), _plain(properties)], default=str, option=orjson.OPT_SORT_KEYS)
    return "b-" + hashlib.sha256(body + carried).hexdigest()[:24]


def describe(message: AbstractIncomingMessage) -> DeadLetterView:
    """Reads why a message is here: our `atlas-*` headers when the worker parked it, else the broker's
    `x-death` (e.g. `delivery_limit` when the worker crashed on it again and again)."""
    headers = dict(message.headers or {})
    body = message.body
    fields = _body_fields(body)
    request_id = read_text(headers.get(Header.REQUEST_ID)) or read_text(fields.get("request_id"))
    message_id = read_text(message.message_id)
    last_death = latest_death(headers)
    if Header.DEAD_LETTERED_AT in headers:
        reason = read_text(headers.get(Header.REASON)) or "unknown"
        at = read_time(headers.get(Header.DEAD_LETTERED_AT))
    else:
        reason = read_text(last_death.get("reason")) or read_text(headers.get("x-first-death-reason")) or "unknown"
        at = read_time(last_death.get("time"))
    properties = {
        "message_id": message_id,
        "correlation_id": read_text(message.correlation_id),
        "reply_to": read_text(message.reply_to),
        "content_type": read_text(message.content_type),
        "timestamp": message.timestamp,
        "app_id": read_text(message.app_id),
    }
    return DeadLetterView(
        id=_identity(headers, properties, body, last_death),
        request_id=request_id,
        tenant=read_text(headers.get(Header.TENANT_ID)) or read_text(fields.get("tenant_id")),
        task=read_text(headers.get(Header.TASK)) or read_text(fields.get("task")),
        reason=reason,
        error_code=read_text(headers.get(Header.ERROR_CODE)),
        attempts=read_count(headers, Header.ATTEMPTS),
        dead_lettered_at=at or read_time(message.timestamp),
        headers=headers,
        properties={k: v for k, v in properties.items() if v is not None},
        body=body,
        history=read_history(headers) if _parked_by_worker(headers, last_death) else (),
    )


class _Naming:
    """Gives each dead letter of one pass over the queue a distinct id: the second message that claims an
    id already seen becomes `ID~2`, so no id can name two dead letters."""

    def __init__(self) -> None:
        self._seen: dict[str, int] = {}

    def unique(self, view: DeadLetterView) -> DeadLetterView:
        count = self._seen.get(view.id, 0) + 1
        self._seen[view.id] = count
        return view if count == 1 else replace(view, id=f"{view.id}~{count}")


class Progress:
    """Counts long operations on stderr: in place on a terminal, a line every `every` items otherwise."""

    def __init__(self, verb: str, total: int, out: TextIO = sys.stderr, every: int = 100) -> None:
        self._verb, self._total, self._out, self._every = verb, total, out, every
        self._tty = out.isatty()
        self.done = 0

    def step(self) -> None:
        self.done += 1
        if self._tty:
            self._out.write(f"\r{self._verb} {self.done}/{self._total}")
            self._out.flush()
        elif self.done % self._every == 0:
            self._out.write(f"{self._verb} {self.done}/{self._total}\n")

    def finish(self) -> None:
        if self._tty and self.done:
            self._out.write("\n")


def signed_again(trust: HeaderTrust, view: DeadLetterView, *, keep_attempts: bool) -> dict[str, Any]:
    """A replay's headers, signed with the workers' key. Only what the key already vouched for is carried on and
    signed: a message the broker dead-lettered itself, or one published straight to the dead-letter queue, keeps
    whatever `atlas-*` headers its publisher forged, and signing those would make the workers believe them. The
    request id signed is the body's, which is what a worker checks the signatures against."""
    request_id = parsed_ids(view.body)[0]
    believed = trust.believed(view.headers, request_id)
    vouched = {k: v for k, v in view.headers.items() if k not in VOUCHED or k in believed}
    headers = replay_headers(vouched, keep_attempts=keep_attempts)
    headers.pop(Header.SIGNATURE, None)
    return headers | trust.signature(request_id, headers)


@dataclass(frozen=True)
class Replayed:
    """What a replay did: how many dead letters it published back, how many it left (`HELD_BACK_FROM_REPLAY`),
    and how many it could not replay because only a prefix of their body was kept."""

    count: int
    held_back: int
    truncated: int = 0


@dataclass
class DeadLetterQueue:
    """The `{ns}.dead` queue of one namespace, over one broker connection."""

    connection: AbstractConnection
    topology: Topology
    # The AMQP user `connection` is authenticated as: a replayed copy is published as it (the broker allows no
    # other), so publisher rules judge a replay by who replayed it.
    user: str | None

    async def _queue(self, channel: AbstractChannel) -> AbstractQueue:
        return await channel.declare_queue(self.topology.dead, passive=True)

    async def count(self) -> int:
        channel = await self.connection.channel()
        try:
            queue = await self._queue(channel)
            return queue.declaration_result.message_count or 0
        finally:
            await channel.close()

    async def browse(self, limit: int | None = None) -> tuple[list[DeadLetterView], int]:
        """Up to `limit` dead letters in queue order, and how many the queue holds. Nothing is removed."""
        channel = await self.connection.channel()
        try:
            queue = await self._queue(channel)
            total = queue.declaration_result.message_count or 0
            views = []
            naming = _Naming()
            # Bounded by the count at the start: messages that arrive meanwhile are not this snapshot's.
            for _ in range(total if limit is None else min(total, limit)):
                message = await queue.get(no_ack=False, fail=False)
                if message is None:
                    break
                views.append(naming.unique(describe(message)))
            return views, total
        finally:
            await channel.close()  # returns every fetched message to the queue

    async def take(
        self,
        selection: Selection,
        act: Callable[[AbstractIncomingMessage, DeadLetterView], Awaitable[bool]],
        progress: Progress | None = None,
        expected: int = 0,
    ) -> int:
        """Run `act` on each selected dead letter, then ack it. A message whose `act` raises or returns False
        is not acked, and neither are the unselected ones: closing the channel returns them all to the queue. An id
        selects one dead letter at most. `expected` is how many a browse just saw: the broker requeues a
        closed channel's messages asynchronously, so they may reach the queue a moment after its count."""
        channel = await self.connection.channel()
        done = 0
        naming = _Naming()
        unused_ids = set(selection.ids)
        try:
            queue = await self._queue(channel)
            for fetched in range(max(queue.declaration_result.message_count or 0, expected)):
                if selection.ids and not unused_ids:
                    break
                message = await self._next(queue, waiting=fetched < expected)
                if message is None:
                    break
                view = naming.unique(describe(message))
                if not selection.matches(view) or (selection.ids and view.id not in unused_ids):
                    continue
                unused_ids.discard(view.id)
                if not await act(message, view):
                    continue
                await message.ack()
                done += 1
                if progress is not None:
                    progress.step()
        finally:
            if progress is not None:
                progress.finish()
            await channel.close()
        return done

    @staticmethod
    async def _next(queue: AbstractQueue, *, waiting: bool) -> AbstractIncomingMessage | None:
        """The next message; when one is `waiting` to be requeued, a short bounded wait for it to arrive."""
        for _ in range(REQUEUE_POLLS if waiting else 1):
            if (message := await queue.get(no_ack=False, fail=False)) is not None:
                return message
            await asyncio.sleep(REQUEUE_POLL_S)
        return None

    async def replay(
        self,
        selection: Selection,
        *,
        keep_attempts: bool,
        trust: HeaderTrust | None = None,
        progress: Progress | None = None,
        expected: int = 0,
    ) -> "Replayed":
        """Publish the selected dead letters back; with `trust` (the workers' header key) each copy's headers are
        signed again, so the workers believe what the replay raised (its settle seq) and what it kept."""
        channel = await self.connection.channel(publisher_confirms=True, on_return_raises=True)
        held_back = truncated = 0
        try:
            exchange = await channel.get_exchange(self.topology.requests, ensure=False)

            async def republish(message: AbstractIncomingMessage, view: DeadLetterView) -> bool:
                nonlocal held_back, truncated
                if view.headers.get(Header.BODY_TRUNCATED) is True:
                    # What was cut is gone: a copy of the prefix can only be refused again, and would lose the
                    # headers that say it was cut. Named or not, it stays where `dlq show` can read it.
                    truncated += 1
                    return False
                if view.reason in HELD_BACK_FROM_REPLAY and not selection.names(view):
                    held_back += 1
                    return False
                if trust is None:
                    headers = replay_headers(view.headers, keep_attempts=keep_attempts)
                else:
                    headers = signed_again(trust, view, keep_attempts=keep_attempts)
                copy = copy_of(message, message.body, headers, user_id=self.user)
                # Waits for the broker's confirm; raises if the copy was not routed to a queue.
                await exchange.publish(copy, REQUEST_ROUTING_KEY, mandatory=True, timeout=PUBLISH_TIMEOUT_S)
                return True

            replayed = await self.take(selection, republish, progress, expected)
            return Replayed(replayed, held_back, truncated)
        finally:
            await channel.close()

    async def purge(self, selection: Selection, progress: Progress | None = None, expected: int = 0) -> int:
        if selection.everything:
            channel = await self.connection.channel()
            try:
                queue = await self._queue(channel)
                result = await queue.purge()
                return result.message_count or 0
            finally:
                await channel.close()

        async def drop(message: AbstractIncomingMessage, view: DeadLetterView) -> bool:
            return True

        return await self.take(selection, drop, progress, expected)


# --- output -------------------------------------------------------------------------------------------


def format_age(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    seconds = max(0, int(seconds))
    for unit, size, smaller, smaller_size in (("d", 86400, "h", 3600), ("h", 3600, "m", 60), ("m", 60, "s", 1)):
        if seconds >= size:
            rest = (seconds % size) // smaller_size
            return f"{seconds // size}{unit}{rest}{smaller}" if rest else f"{seconds // size}{unit}"
    return f"{seconds}s"


def row(view: DeadLetterView, now: datetime) -> dict[str, Any]:
    """A view as JSON-ready data (`list --json`), masked."""
    data = {
        "id": view.id,
        "request_id": view.request_id,
        "tenant": view.tenant,
        "task": view.task,
        "reason": view.reason,
        "error_code": view.error_code,
        "error_message": read_text(view.headers.get(Header.ERROR_MESSAGE)),
        "attempts": view.attempts,
        "dead_lettered_at": view.dead_lettered_at.isoformat() if view.dead_lettered_at else None,
        "age_s": round(age, 3) if (age := view.age_s(now)) is not None else None,
    }
    masked: dict[str, Any] = redact(data)
    return masked


def escaped(text: str) -> str:
    """`text` with every character a terminal would act on (newlines, ESC, bidi and other controls) written
    as a Python escape, so a value can neither start a new row nor send control sequences."""
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


def table(views: Sequence[DeadLetterView], now: datetime) -> str:
    columns = ("ID", "REQUEST", "TENANT", "TASK", "REASON", "ERROR", "ATTEMPTS", "AGE")
    lines = [
        tuple(
            escaped(redact_text(cell))
            for cell in (
                v.id,
                v.request_id or "-",
                v.tenant or "-",
                v.task or "-",
                v.reason,
                v.error_code or "-",
                str(v.attempts),
                format_age(v.age_s(now)),
            )
        )
        for v in views
    ]
    return _aligned(columns, lines)


def _aligned(columns: Sequence[str], lines: Sequence[Sequence[str]]) -> str:
    widths = [max(len(columns[i]), *(len(line[i]) for line in lines)) for i in range(len(columns))]
    return "\n".join(
        "  ".join(cell.ljust(widths[i]) for i, cell in enumerate(line)).rstrip() for line in (columns, *lines)
    )


def history_table(entries: History) -> list[str]:
    """A dead letter's attempt history as a small table, masked and escaped like every other value."""
    if not entries:
        return []
    columns = ("AT", "CLASS", "CODE", "CALLED", "LEVEL", "NEXT TRY")
    lines = [
        tuple(
            escaped(redact_text(cell))
            for cell in (
                e.at.isoformat(),
                e.error_class or "-",
                e.code,
                "yes" if e.provider_called else "no (circuit open)",
                "-" if e.level is None else str(e.level),
                e.next_attempt_at.isoformat() if e.next_attempt_at else "-",
            )
        )
        for e in entries
    ]
    return ["history (oldest first):", *("  " + line for line in _aligned(columns, lines).split("\n"))]


def _plain(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def _printable(body: bytes, limit: int = 4000) -> str:
    """Text as it is; anything else escaped, so control bytes never reach the operator's terminal."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        text = None
    if text is not None and all(c.isprintable() or c in "\n\t" for c in text):
        return text[:limit] + (f"… ({len(text) - limit} more characters)" if len(text) > limit else "")
    return f"({len(body)} bytes, not text) {body[:limit]!r}"


def detail(view: DeadLetterView) -> dict[str, Any]:
    """Everything about one dead letter, masked: properties, headers and the body (parsed when JSON)."""
    try:
        body: Any = orjson.loads(view.body)
    except orjson.JSONDecodeError:
        body = _printable(view.body)
    shown: dict[str, Any] = redact(
        _plain({"id": view.id, "reason": view.reason, "properties": view.properties, "headers": view.headers})
    )
    shown["body"] = redact(body)
    return shown


def render_detail(view: DeadLetterView) -> str:
    """Text for a terminal: every property and header on one line of its own, values escaped."""
    shown = detail(view)
    out = [f"id:      {escaped(shown['id'])}", f"reason:  {escaped(shown['reason'])}", "properties:"]
    out += [f"  {escaped(k)}: {escaped(str(v))}" for k, v in shown["properties"].items()]
    out.append("headers:")
    for key in sorted(shown["headers"]):
        value = shown["headers"][key]
        text = value if isinstance(value, str) else json.dumps(value, default=str)
        out.append(f"  {escaped(key)}: {escaped(text)}")
    out += history_table(view.history)
    out.append("body:")
    body = shown["body"]
    # JSON escapes newlines inside strings, so the only newlines left are its own layout (and a text body's).
    text = body if isinstance(body, str) else json.dumps(body, indent=2, ensure_ascii=False)
    out += [escaped(line) for line in text.split("\n")]
    return "\n".join(out)
