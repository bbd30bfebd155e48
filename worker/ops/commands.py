"""What `atlas-worker dlq …` and `atlas-worker topology …` do once their arguments are parsed."""

import argparse
import asyncio
import json
import sys
from dataclasses import replace
from datetime import UTC, datetime

import aio_pika

from contracts import Header, Topology
from worker.broker.amqp_url import login_user
from worker.broker.connection import broker_error, first_connection
from worker.broker.definitions import declare_everything, definitions, render
from worker.broker.header_trust import HeaderTrust, load_keys
from worker.broker.topology import TopologySpec, topology_spec
from worker.exit_codes import ExitCode, StartupError
from worker.handling.ladder import RetryLadder
from worker.ops.dlq import (
    HELD_BACK_FROM_REPLAY,
    DeadLetterQueue,
    Progress,
    Selection,
    Unresolved,
    detail,
    filter_problem,
    render_detail,
    resolve,
    row,
    table,
)


def _selection(args: argparse.Namespace) -> Selection:
    return Selection(
        ids=frozenset(getattr(args, "ids", None) or ()),
        tenant=args.tenant,
        task=args.task,
        reason=args.reason,
        everything=getattr(args, "all", False),
    )


def _confirm(question: str) -> bool:
    print(f"{question} [y/N] ", end="", flush=True)
    try:
        answer = sys.stdin.readline()
    except KeyboardInterrupt:
        answer = ""
    return answer.strip().lower() in ("y", "yes")


async def _dlq(args: argparse.Namespace) -> int:
    if problem := filter_problem(args.task, args.reason):
        print(problem, file=sys.stderr)
        return 2
    topology = Topology(args.namespace)
    try:
        with first_connection():
            connection = await aio_pika.connect(args.amqp_url)
    except (OSError, aio_pika.exceptions.AMQPError) as exc:
        raise broker_error(exc, args.amqp_url) from None
    try:
        dlq = DeadLetterQueue(connection, topology, login_user(args.amqp_url))
        try:
            return await _DLQ_COMMANDS[args.dlq_command](dlq, args)
        except aio_pika.exceptions.ChannelNotFoundEntity as exc:
            print(
                f"{exc}: namespace {topology.namespace!r} is not declared on this broker. Check --namespace for a "
                "typo (`rabbitmqctl list_queues name` lists what is there); a worker declares its namespace when "
                "it starts",
                file=sys.stderr,
            )
            return 2
    finally:
        await connection.close()


async def _list(dlq: DeadLetterQueue, args: argparse.Namespace) -> int:
    views, total = await dlq.browse(limit=args.limit)
    selection = _selection(args)
    shown = [v for v in views if selection.matches(v)]
    now = datetime.now(UTC)
    if args.json:
        print(json.dumps([row(v, now) for v in shown], indent=2))
        return 0
    if not shown:
        print(f"no dead letters{' matching' if not selection.is_empty else ''} in {dlq.topology.dead}")
    else:
        print(table(shown, now))
    summary = f"{len(shown)} shown of {total} in {dlq.topology.dead}"
    if total > len(views):
        summary += f" (looked at the first {len(views)}; raise --limit to see more)"
    print(summary, file=sys.stderr)
    return 0


async def _resolved(dlq: DeadLetterQueue, args: argparse.Namespace) -> tuple[Selection, int, int]:
    """The selection with every name resolved to one dead-letter id, how many dead letters it selects and
    how many the queue holds. Raises Unresolved for a name that fits none or several."""
    selection = _selection(args)
    if selection.everything:
        total = await dlq.count()
        return selection, total, total
    views, total = await dlq.browse()
    if selection.ids:
        named = frozenset(resolve(views, name).id for name in selection.ids)
        selection = replace(selection, ids=named)
    return selection, sum(1 for v in views if selection.matches(v)), total


async def _show(dlq: DeadLetterQueue, args: argparse.Namespace) -> int:
    views, _ = await dlq.browse()
    try:
        found = [resolve(views, args.id)]
    except Unresolved as exc:
        print(f"{exc} in {dlq.topology.dead}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps([detail(v) for v in found], indent=2, ensure_ascii=False))
    else:
        print("\n\n".join(render_detail(v) for v in found))
    return 0


async def _replay(dlq: DeadLetterQueue, args: argparse.Namespace) -> int:
    selection = _selection(args)
    if selection.is_empty:
        print("say which dead letters to replay: IDs, --tenant/--task/--reason, or --all", file=sys.stderr)
        return 2
    try:
        selection, chosen, total = await _resolved(dlq, args)
    except Unresolved as exc:
        print(f"{exc} in {dlq.topology.dead}", file=sys.stderr)
        return 1
    progress = Progress("replayed", chosen)
    key, previous = load_keys(args.header_key, args.header_key_previous)
    trust = HeaderTrust(dlq.topology, key, previous) if key is not None else None
    try:
        replayed = await dlq.replay(
            selection, keep_attempts=args.keep_attempts, trust=trust, progress=progress, expected=total
        )
    except aio_pika.exceptions.PublishError:
        print(
            f"stopped after {progress.done}: {dlq.topology.requests} did not route a copy to any queue; "
            "the rest are still dead letters",
            file=sys.stderr,
        )
        return 1
    print(f"replayed {replayed.count} dead letter(s) to {dlq.topology.requests}")
    if replayed.count and trust is None:
        print(
            "replayed without --header-key: nothing vouches for the copies' raised atlas-settle-seq, so their "
            "replies rank as fresh ones (settle_seq 0) and do not outrank the replies their dead letters got; "
            "replay with the workers' --header-key so they do",
            file=sys.stderr,
        )
    if replayed.truncated:
        print(
            f"left {replayed.truncated} dead letter(s) in {dlq.topology.dead} that hold only the first part of their "
            f"body ({Header.BODY_TRUNCATED}): no replay can restore the rest; `dlq show ID` shows what was kept, "
            "and the publisher must send the request again",
            file=sys.stderr,
        )
    if replayed.held_back:
        reasons = ", ".join(sorted(HELD_BACK_FROM_REPLAY))
        print(
            f"left {replayed.held_back} {reasons} dead letter(s) in {dlq.topology.dead}: replayed as "
            f"{dlq.user or 'this user'} they would get past the --publisher rules that refused them; "
            f"name them by id, or select --reason {reasons}, to replay them anyway",
            file=sys.stderr,
        )
    return 0


async def _purge(dlq: DeadLetterQueue, args: argparse.Namespace) -> int:
    selection = _selection(args)
    if selection.is_empty:
        args.all = True
    try:
        selection, chosen, total = await _resolved(dlq, args)
    except Unresolved as exc:
        print(f"{exc} in {dlq.topology.dead}", file=sys.stderr)
        return 1
    what = "all" if selection.everything else f"{chosen} matching"
    question = f"Delete {what} of the {total} dead letter(s) in {dlq.topology.dead}; this cannot be undone?"
    if not chosen:
        print(f"no dead letters match in {dlq.topology.dead}; nothing deleted")
        return 0
    if not args.yes and not _confirm(question):
        print("nothing deleted")
        return 1
    purged = await dlq.purge(selection, progress=Progress("deleted", chosen), expected=total)
    print(f"deleted {purged} dead letter(s) from {dlq.topology.dead}")
    return 0


_DLQ_COMMANDS = {"list": _list, "show": _show, "replay": _replay, "purge": _purge}


def dlq_command(args: argparse.Namespace) -> int:
    return asyncio.run(_dlq(args))


def topology_command(args: argparse.Namespace) -> int:
    topology = Topology(args.namespace)
    try:
        ladder = RetryLadder(args.retry_base, args.retry_factor, args.retry_levels)
    except ValueError as exc:
        raise StartupError(ExitCode.USAGE, str(exc)) from None
    spec = topology_spec(topology, ladder, delivery_limit=args.delivery_limit)
    if args.topology_command == "definitions":
        document = definitions(spec, vhost=args.vhost, atlas_cloud_exchange=args.atlas_cloud_exchange)
        print(render(document), end="")
        return 0
    try:
        with first_connection():
            asyncio.run(declare_everything(args.amqp_url, spec, args.atlas_cloud_exchange))
    except (OSError, aio_pika.exceptions.AMQPError) as exc:
        raise broker_error(exc, args.amqp_url) from None
    print(declared_summary(spec, args.namespace, args.atlas_cloud_exchange))
    return 0


def declared_summary(spec: TopologySpec, namespace: str, atlas_cloud_exchange: str) -> str:
    """One line per entity with its kind, under counts that match the lines."""
    exchanges = [(name, kind.value) for name, kind in spec.exchanges]
    exchanges.append((atlas_cloud_exchange, "topic, Atlas Cloud's: used as it is if it exists"))
    bindings = sum(len(q.bindings) for q in spec.queues)
    lines = [
        f"declared for namespace {namespace!r}: {len(exchanges)} exchanges, {len(spec.queues)} queues, "
        f"{bindings} bindings"
    ]
    width = max(len(name) for name, _ in exchanges + [(q.name, "") for q in spec.queues])
    lines += [f"  exchange  {name:<{width}}  {kind}" for name, kind in exchanges]
    for queue in spec.queues:
        sources = ", ".join(f"{exchange} ({key or 'any key'})" for exchange, key in queue.bindings)
        lines.append(f"  queue     {queue.name:<{width}}  bound to {sources}")
    return "\n".join(lines)
