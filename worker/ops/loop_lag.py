"""Measures how late the event loop wakes a sleeping task, and records each lag in a histogram."""

import asyncio

from prometheus_client import Histogram


async def watch_loop_lag(lag: Histogram, interval_s: float) -> None:
    """Sleep `interval_s` again and again; each overshoot is the time the loop was busy elsewhere.

    Anything that holds the loop for B seconds shows as one sample of at least B - interval_s, so short
    intervals catch short stalls; a wake-up every 0.1 s costs nothing measurable."""
    loop = asyncio.get_running_loop()
    while True:
        due = loop.time() + interval_s
        await asyncio.sleep(interval_s)
        lag.observe(max(0.0, loop.time() - due))
