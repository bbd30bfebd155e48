"""Summarises a py-spy `--format raw` profile (collapsed stacks) into where the worker's time goes."""

import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

FRAME = re.compile(r"^(?P<function>.*?) \((?P<file>[^:()]+)(?::\d+)?\)$")

# Inclusive buckets: a sample counts for a bucket when every marker of one of its alternatives is in its stack.
BUCKETS: dict[str, tuple[tuple[str, ...], ...]] = {
    "decode + validate request (pydantic)": (("decode (worker/broker/consumer.py",),),
    "decode request (plain loop: orjson)": (("on_message (bench/target.py", "loads"),),
    "prompt building (build_call)": (("build_call (",),),
    "thread-pool handoff (submit, wake-up, pool threads)": (
        ("ThreadPoolExecutor.submit (",),
        ("_write_to_self (",),
        ("_worker (concurrent/futures/thread.py",),
    ),
    "build the reply model (InferenceReply)": (("answer (worker/handling/replies.py",),),
    "reply to JSON (model_dump + orjson)": (("_publish_reply (worker/broker/settle.py", "model_dump ("),),
    "settle: publish + confirm + ack calls": (("settle (worker/broker/settle.py",),),
    "publish + ack calls (plain loop)": (
        ("on_message (bench/target.py", "publish ("),
        ("on_message (bench/target.py", "ack ("),
    ),
    "AMQP socket writes (aiormq writer task)": (("__writer (",),),
    "AMQP frame reading (aiormq reader task)": (("__reader (",), ("_reader (",)),
    "incoming message objects (aio-pika)": (("IncomingMessage.__init__ (",),),
    "logging (structlog)": (("structlog/",),),
    "HTTP client call (aiohttp)": (("aiohttp/client.py",),),
    "FastStream framework": (("faststream/",),),
}


@dataclass(frozen=True)
class Profile:
    samples: int
    by_package: list[tuple[str, float]]  # self time
    by_function: list[tuple[str, float]]  # self time
    buckets: list[tuple[str, float]]  # inclusive


def _package(path: str) -> str:
    if "site-packages/" in path:
        return path.split("site-packages/", 1)[1].split("/", 1)[0].removesuffix(".py")
    if "/python3." in path:
        parts = path.split("/python3.", 1)[1].split("/")
        return parts[1].removesuffix(".py") if len(parts) > 1 else "python"
    for top in ("worker/", "contracts/", "bench/"):
        if top in path:
            return top + path.split(top, 1)[1]
    return path


def summarise(path: Path, top: int = 12) -> Profile:
    by_package: Counter[str] = Counter()
    by_function: Counter[str] = Counter()
    buckets: Counter[str] = Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        total += count
        frames = stack.split(";")
        leaf = FRAME.match(frames[-1])
        if leaf:
            by_package[_package(leaf["file"])] += count
            by_function[f"{leaf['function']} ({_package(leaf['file'])})"] += count
        for name, alternatives in BUCKETS.items():
            if any(all(marker in stack for marker in markers) for markers in alternatives):
                buckets[name] += count
    if not total:
        return Profile(0, [], [], [])

    def share(counter: Counter[str]) -> list[tuple[str, float]]:
        return [(name, 100 * n / total) for name, n in counter.most_common(top)]

    return Profile(total, share(by_package), share(by_function), [(n, 100 * buckets[n] / total) for n in BUCKETS])
