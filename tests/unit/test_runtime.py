"""The event-loop choice and the garbage-collector tuning the worker runs with."""

import asyncio
import gc
from collections.abc import Iterator

import pytest
from structlog.testing import capture_logs

from worker import runtime
from worker.cli import build_parser
from worker.log import configure_logging


@pytest.fixture(autouse=True)
def info_logs(restore_logging: None) -> None:
    configure_logging("info", cache=False)  # the suite's default drops the info events these tests read


@pytest.fixture
def gc_restored() -> Iterator[None]:
    threshold = gc.get_threshold()
    yield
    gc.set_threshold(*threshold)
    gc.unfreeze()


def test_auto_picks_uvloop_where_it_is_installed_and_asyncio_can_be_forced() -> None:
    assert runtime.uvloop_available()  # a dependency on Linux and macOS
    assert runtime.loop_factory("auto")[0] == "uvloop"
    assert runtime.loop_factory("uvloop")[0] == "uvloop"
    assert runtime.loop_factory("asyncio") == ("asyncio", asyncio.new_event_loop)
    with pytest.raises(ValueError, match="unknown event loop 'trio'"):
        runtime.loop_factory("trio")


@pytest.mark.parametrize(("loop", "module"), [("uvloop", "uvloop"), ("asyncio", "asyncio.unix_events")])
def test_run_uses_the_chosen_loop_and_threshold_and_reports_them_once_started(
    gc_restored: None, loop: str, module: str
) -> None:
    async def start() -> str:
        runtime.freeze_heap()
        return type(asyncio.get_running_loop()).__module__

    with capture_logs() as logs:
        assert runtime.run(start(), loop=loop, gc_threshold=12_345) == module
    assert gc.get_threshold()[0] == 12_345
    assert [e["event"] for e in logs] == ["heap_frozen", "gc_summary"]
    assert (logs[0]["loop"], logs[0]["requested_loop"], logs[0]["gc_threshold"]) == (loop, loop, 12_345)
    assert len(logs[1]["collections"]) == 3


def test_a_start_that_fails_logs_nothing_of_its_own(gc_restored: None) -> None:
    async def fail() -> None:
        raise RuntimeError("tenants directory: does not exist")

    with capture_logs() as logs, pytest.raises(RuntimeError):
        runtime.run(fail(), loop="auto", gc_threshold=700)
    assert logs == []


async def test_freezing_the_heap_takes_what_is_alive_out_of_later_collections(gc_restored: None) -> None:
    alive = [[n] for n in range(1000)]
    with capture_logs() as logs:
        runtime.freeze_heap()
    assert gc.get_freeze_count() >= len(alive)
    assert [e["event"] for e in logs] == ["heap_frozen"]
    assert logs[0]["objects"] >= len(alive)


async def test_the_meter_counts_collections_by_generation(gc_restored: None) -> None:
    with capture_logs() as logs, runtime.GcMeter() as meter:
        runtime.freeze_heap()
        gc.collect(0)
        gc.collect(2)
    assert meter.collections[0] >= 1
    assert meter.collections[2] >= 1
    assert [e["event"] for e in logs] == ["heap_frozen", "gc_summary"]
    assert logs[1]["collections"] == meter.collections


def test_run_flags_default_to_auto_and_the_measured_threshold(monkeypatch: pytest.MonkeyPatch) -> None:
    args = build_parser().parse_args(["run"])
    assert (args.loop, args.gc_threshold) == ("auto", runtime.DEFAULT_GC_THRESHOLD)
    monkeypatch.setenv("ATLAS_EVENT_LOOP", "asyncio")
    monkeypatch.setenv("ATLAS_GC_THRESHOLD", "700")
    args = build_parser().parse_args(["run"])
    assert (args.loop, args.gc_threshold) == ("asyncio", 700)
    args = build_parser().parse_args(["run", "--loop", "uvloop", "--gc-threshold", "100000"])
    assert (args.loop, args.gc_threshold) == ("uvloop", 100_000)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["run", "--gc-threshold", "-1"])


@pytest.mark.parametrize(("variable", "value"), [("ATLAS_EVENT_LOOP", "trio"), ("ATLAS_GC_THRESHOLD", "lots")])
def test_a_bad_environment_value_is_a_usage_error(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], variable: str, value: str
) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(["run"])
    assert exit_info.value.code == 2
    assert value in capsys.readouterr().err
