"""Opening broker connections: the first attempt bounded in time, its failure reported as one line."""

import asyncio
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import aio_pika
import aiormq
from aio_pika.abc import AbstractChannel, AbstractQueue, AbstractRobustConnection

from worker.broker.topology import TopologySpec, declare, declare_atlas_cloud
from worker.broker.transport import CoalescingRobustConnection
from worker.exit_codes import ExitCode, StartupError
from worker.redaction import redact_text, remember_url_credentials


def broker_error(exc: BaseException, amqp_url: str) -> StartupError:
    """Classify a failed connection attempt or declaration; the URL is shown without its password."""
    where = redact_text(amqp_url)
    detail = redact_text(str(exc) or type(exc).__name__)
    if isinstance(exc, aiormq.exceptions.ChannelPreconditionFailed):
        return topology_mismatch(f"the broker at {where}", detail)
    if isinstance(exc, aio_pika.exceptions.ProbableAuthenticationError) or "ACCESS_REFUSED" in detail:
        return StartupError(ExitCode.BROKER_AUTH, f"the broker at {where} refused the credentials: {detail}")
    if "Connection.OpenOk" in detail and "Connection.Close" in detail:
        # Logged in, then refused Connection.Open: the URL's virtual host (the path) is unknown or not permitted.
        return StartupError(
            ExitCode.BROKER_AUTH,
            f"the broker at {where} accepted the credentials but refused the virtual host (the URL's path): it "
            "does not exist, or this user has no permission on it",
        )
    return StartupError(ExitCode.BROKER_UNREACHABLE, f"cannot reach the broker at {where}: {detail}")


def topology_mismatch(broker: str, detail: str) -> StartupError:
    return StartupError(
        ExitCode.TOPOLOGY_MISMATCH,
        f"{broker} already holds this namespace declared with other arguments ({detail}): start with the flags "
        "it was declared with (--retry-base, --retry-factor, --retry-levels, --delivery-limit), or use another "
        "--namespace; queue arguments cannot change in place",
    )


@contextmanager
def first_connection() -> Iterator[None]:
    """Around a first connection attempt whose failure the caller reports as one line: the AMQP library would
    log the same failure again, with a traceback."""
    library = logging.getLogger("aiormq.connection")
    level = library.level
    library.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        library.setLevel(level)


async def connect_worker(amqp_url: str, namespace: str, timeout_s: float) -> AbstractRobustConnection:
    """The worker's robust connection, its frames of one loop turn sent together (`worker.broker.transport`).
    Only the first attempt is bounded in time: once connected, the robust connection reconnects by itself."""
    remember_url_credentials(amqp_url)  # the library's own errors and log lines may quote the URL
    try:
        with first_connection():
            return await asyncio.wait_for(
                aio_pika.connect_robust(
                    amqp_url,
                    client_properties={"connection_name": f"atlas-worker:{namespace}"},
                    connection_class=CoalescingRobustConnection,
                ),
                timeout_s,
            )
    except (OSError, aio_pika.exceptions.AMQPError) as exc:  # TimeoutError is an OSError
        raise broker_error(exc, amqp_url) from None


@dataclass(frozen=True)
class WorkerChannels:
    """The worker's two channels: one publishing with confirms, one consuming `{ns}.requests`."""

    publish: AbstractChannel
    consume: AbstractChannel
    requests: AbstractQueue


async def open_channels(
    connection: AbstractRobustConnection, spec: TopologySpec, atlas_cloud_exchange: str, prefetch: int
) -> WorkerChannels:
    """Declare the topology, then open the channel the requests are consumed on with `prefetch` in flight."""
    publish = await connection.channel(publisher_confirms=True, on_return_raises=True)
    try:
        await declare(publish, spec)
    except aiormq.exceptions.ChannelPreconditionFailed as exc:
        raise topology_mismatch("the broker", redact_text(str(exc))) from None
    await declare_atlas_cloud(connection, atlas_cloud_exchange)
    consume = await connection.channel(publisher_confirms=False)
    await consume.set_qos(prefetch_count=prefetch)
    # Declared (not just looked up) on this channel so the robust connection re-consumes it after a reconnect.
    requests_spec = spec.queues[0]
    requests = await consume.declare_queue(requests_spec.name, durable=True, arguments=requests_spec.arguments)
    return WorkerChannels(publish, consume, requests)
