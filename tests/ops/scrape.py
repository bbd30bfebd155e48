"""Reads a worker's HTTP endpoints the way Prometheus and the kubelet do."""

import asyncio
import socket
from collections.abc import Callable
from typing import Any

import aiohttp
from prometheus_client.parser import text_string_to_metric_families


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class Samples:
    """One scrape of `/metrics`: look samples up by name and a subset of labels."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.rows = [
            (sample.name, dict(sample.labels), sample.value)
            for family in text_string_to_metric_families(text)
            for sample in family.samples
        ]

    def value(self, name: str, **labels: str) -> float:
        """Sum of the samples named `name` whose labels include `labels` (0 when there are none)."""
        return sum(v for n, lab, v in self.rows if n == name and labels.items() <= lab.items())

    def label_values(self, label: str) -> set[str]:
        return {lab[label] for _, lab, _ in self.rows if label in lab}

    def loop_lags(self, bound_s: float) -> tuple[float, float]:
        """(samples taken, samples at or under `bound_s`, a bucket bound) of the event-loop lag histogram."""
        name = "atlas_worker_event_loop_lag_seconds"
        return self.value(f"{name}_count"), self.value(f"{name}_bucket", le=str(bound_s))


async def scrape(port: int) -> Samples:
    async with aiohttp.ClientSession() as session, session.get(f"http://127.0.0.1:{port}/metrics") as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain")
        return Samples(await response.text())


async def get_json(port: int, path: str) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as session, session.get(f"http://127.0.0.1:{port}{path}") as response:
        return response.status, await response.json()


async def scrape_until(port: int, done: Callable[[Samples], bool], timeout_s: float = 30.0) -> Samples:
    """Scrape until `done` holds (or fail showing the last scrape)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while True:
        samples = await scrape(port)
        if done(samples):
            return samples
        if loop.time() > deadline:
            raise AssertionError(f"metrics never reached the expected state:\n{samples.text}")
        await asyncio.sleep(0.1)
