"""The `atlas-worker` command line: run, test-connection, dlq, topology, tenants."""

import argparse
import asyncio
import ipaddress
import json
import math
import signal
import sys
from collections.abc import Callable
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, TypeVar

from worker import runtime
from worker.broker.amqp_url import amqp_url_problem
from worker.broker.publishers import PublisherRules
from worker.exit_codes import ExitCode, StartupError
from worker.handling.ladder import RetryLadder
from worker.log import configure_logging
from worker.providers.breaker import BreakerPolicy
from worker.redaction import remember_url_credentials
from worker.runtime import LOOPS, env_gc_threshold, env_loop
from worker.settings import (
    DEFAULT_AMQP_URL,
    DEFAULT_TENANTS_DIR,
    SettingsError,
    WorkerSettings,
    env_amqp_url,
    env_tenants_dir,
)
from worker.tenants import validate_path

TENANTS_HELP = f"directory of <tenant_id>.toml files (env ATLAS_TENANTS_DIR; default {DEFAULT_TENANTS_DIR})"


def _add_broker_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--amqp-url",
        default=env_amqp_url(),
        help=f"broker URL (env AMQP_URL; default {DEFAULT_AMQP_URL})",
    )
    parser.add_argument(
        "--namespace",
        default=WorkerSettings.namespace,
        help="prefix of every exchange and queue (default: %(default)s)",
    )


def _add_security_flags(run: argparse.ArgumentParser) -> None:
    run.add_argument(
        "--max-body-bytes",
        type=_positive_int,
        default=WorkerSettings.max_body_bytes,
        help="largest request body handled; a bigger one is dead-lettered as a prefix (default: %(default)s)",
    )
    run.add_argument(
        "--max-body-entries",
        type=_positive_int,
        default=WorkerSettings.max_body_entries,
        help="most object members and array elements a request body may hold; each costs validation time on the "
        "event loop (default: %(default)s)",
    )
    _add_header_key_flags(run, "HMAC key that signs the worker's own headers, so forged atlas-* headers are ignored")
    run.add_argument(
        "--publisher",
        action="append",
        default=[],
        metavar="USER=TENANT[,TENANT…]",
        help="only these AMQP users may publish requests, each for these tenants (* for any); repeatable",
    )
    run.add_argument(
        "--reply-to",
        action="append",
        default=[],
        metavar="PATTERN",
        help="reply_to names allowed, as shell patterns such as 'replies-*'; repeatable (default: any)",
    )


def _add_header_key_flags(parser: argparse.ArgumentParser, text: str) -> None:
    parser.add_argument("--header-key", metavar="env:NAME|file:/path", help=text)
    parser.add_argument(
        "--header-key-previous",
        action="append",
        default=[],
        metavar="env:NAME|file:/path",
        help="a key being rotated out: headers it signed are still believed, nothing new is signed with it; repeatable",
    )


def _security_settings(args: argparse.Namespace) -> dict[str, Any]:
    try:
        publishers = PublisherRules.parse(args.publisher, args.reply_to)
    except ValueError as exc:
        raise StartupError(ExitCode.USAGE, f"--publisher: {exc}") from None
    return {
        "max_body_bytes": args.max_body_bytes,
        "max_body_entries": args.max_body_entries,
        "header_key": args.header_key,
        "header_key_previous": tuple(args.header_key_previous),
        "publishers": publishers,
    }


def _add_runtime_flags(run: argparse.ArgumentParser) -> None:
    group = run.add_argument_group("runtime")
    group.add_argument(
        "--loop",
        choices=LOOPS,
        type=_loop_name,  # also checks ATLAS_EVENT_LOOP: argparse does not hold a default to `choices`
        default=env_loop(),
        help="event loop: uvloop, asyncio's own, or auto = uvloop when installed (env ATLAS_EVENT_LOOP; "
        "default: %(default)s)",
    )
    group.add_argument(
        "--gc-threshold",
        type=_non_negative_int,
        default=env_gc_threshold(),
        metavar="N",
        help="allocations between first-generation garbage collections; the heap built at start-up is "
        "frozen either way (env ATLAS_GC_THRESHOLD; default: %(default)s, CPython's own is 700)",
    )


def _add_breaker_flags(parser: argparse.ArgumentParser) -> None:
    defaults = BreakerPolicy()
    parser.add_argument(
        "--breaker-failure-rate",
        type=_share,
        default=defaults.failure_rate,
        help="share of an endpoint's recent requests, last call failed, that opens its circuit (default: %(default)s)",
    )
    parser.add_argument(
        "--breaker-min-calls",
        type=_positive_int,
        default=defaults.min_calls,
        help="requests in the window before the rate is judged (default: %(default)s)",
    )
    parser.add_argument(
        "--breaker-window",
        type=_positive_number,
        default=defaults.window_s,
        help="seconds of recent requests the rate is judged over (default: %(default)s)",
    )
    parser.add_argument(
        "--breaker-cooldown",
        type=_non_negative_number,
        default=defaults.cooldown_s,
        help="seconds an open circuit refuses calls before probing (default: %(default)s)",
    )
    parser.add_argument(
        "--breaker-probes",
        type=_positive_int,
        default=defaults.probes,
        help="calls let through after the cooldown to decide whether it closes (default: %(default)s)",
    )


def _add_ladder_flags(parser: argparse.ArgumentParser, *, helped: bool) -> None:
    """The retry ladder's flags, defaults from `RetryLadder` (shown as `1`, not `1.0`)."""
    ladder = RetryLadder
    flags = (
        ("--retry-base", _positive_number, ladder.base_s, "first retry delay in seconds"),
        ("--retry-factor", _growth, ladder.factor, "growth per retry level, at least 1"),
        ("--retry-levels", _positive_int, ladder.levels, "number of retry levels"),
    )
    for flag, kind, default, text in flags:
        parser.add_argument(flag, type=kind, default=default, help=f"{text} (default: {default:g})" if helped else None)


LOG_LEVEL_DEFAULT = "info"


def _global_options() -> argparse.ArgumentParser:
    """Options every command takes, before or after its name. SUPPRESS, so that a subcommand's parser does
    not overwrite a value given before the subcommand with its own default; `main` fills the defaults in."""
    options = argparse.ArgumentParser(add_help=False)
    options.add_argument(
        "--log-level",
        default=argparse.SUPPRESS,
        choices=["debug", "info", "warning", "error"],
        help=f"(default: {LOG_LEVEL_DEFAULT})",
    )
    options.add_argument(
        "--log-format",
        default=argparse.SUPPRESS,
        choices=["json", "console"],
        help="console on a terminal, else JSON lines (the default)",
    )
    return options


def _version() -> str:
    try:
        return version("atlas-inference-worker")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown"


class _Commands:
    """Subcommands that all take the global options, at any depth."""

    def __init__(
        self, subparsers: "argparse._SubParsersAction[argparse.ArgumentParser]", common: argparse.ArgumentParser
    ) -> None:
        self._subparsers = subparsers
        self._common = common

    def add_parser(self, name: str, **kwargs: Any) -> argparse.ArgumentParser:
        return self._subparsers.add_parser(name, parents=[self._common], **kwargs)

    def nested(self, parser: argparse.ArgumentParser, dest: str) -> "_Commands":
        return _Commands(parser.add_subparsers(dest=dest, required=True, metavar="SUBCOMMAND"), self._common)


def build_parser() -> argparse.ArgumentParser:
    common = _global_options()
    parser = argparse.ArgumentParser(
        prog="atlas-worker",
        description="Answers incident inference requests from RabbitMQ with each tenant's own LLM.",
        parents=[common],
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    commands = _Commands(parser.add_subparsers(dest="command", required=True, metavar="COMMAND"), common)
    for add in (_add_run, _add_test_connection, _add_tenants, _add_dlq, _add_topology):
        add(commands)
    return parser


def _add_run(commands: _Commands) -> None:
    """`run`: the worker itself."""
    run = commands.add_parser("run", help="consume requests and publish replies until SIGTERM")
    _add_broker_flags(run)
    run.add_argument(
        "--tenants",
        type=_given_path,
        default=None,
        help=TENANTS_HELP,
    )
    run.add_argument(
        "--prefetch",
        type=_positive_int,  # 0 would be AMQP's "no limit": the whole queue delivered to one worker
        default=WorkerSettings.prefetch,
        help="deliveries in flight (default: %(default)s)",
    )
    run.add_argument(
        "--atlas-cloud-exchange",
        default=WorkerSettings.atlas_cloud_exchange,
        help="where unconfigured tenants and atlas_cloud fallbacks go (default: %(default)s)",
    )
    run.add_argument(
        "--grace",
        type=_non_negative_number,
        default=WorkerSettings.grace_s,
        help="seconds in-flight calls may finish after SIGTERM (default: %(default)s)",
    )
    run.add_argument(
        "--delivery-limit",
        type=_positive_int,
        default=WorkerSettings.delivery_limit,
        help="deliveries of one message before the broker dead-letters it (default: %(default)s)",
    )
    _add_ladder_flags(run, helped=True)
    _add_breaker_flags(run)
    _add_runtime_flags(run)
    run.add_argument(
        "--metrics-port", type=_port, default=WorkerSettings.metrics_port, help="serve /healthz, /readyz, /metrics here"
    )
    run.add_argument(
        "--metrics-host",
        default=WorkerSettings.metrics_host,
        help="address the metrics port binds (default: %(default)s, every interface)",
    )
    run.add_argument(
        "--max-response-bytes",
        type=_positive_int,
        default=WorkerSettings.max_response_bytes,
        help="largest provider response, counted before and after decompression (default: %(default)s)",
    )
    run.add_argument(
        "--allow-draft-cidr",
        dest="allow_draft_cidrs",
        action="append",
        type=_cidr,
        default=[],
        metavar="CIDR",
        help="a loopback or private range that Test Connection drafts from messages may reach (repeatable; "
        "default: none, metadata and link-local addresses stay refused)",
    )
    _add_security_flags(run)
    run.set_defaults(func=_run)


def _add_test_connection(commands: _Commands) -> None:
    """`test-connection`: probe a tenant's provider."""
    test = commands.add_parser(
        "test-connection", help="probe a tenant's provider and check it against the model requirements"
    )
    source = test.add_mutually_exclusive_group(required=True)
    source.add_argument("--tenant", help="test the stored configuration of this tenant id")
    source.add_argument("--config", type=Path, help="test a tenant file that is not saved yet (a draft)")
    test.add_argument(
        "--tenants",
        type=_given_path,
        default=None,
        help=TENANTS_HELP,
    )
    test.add_argument("--json", action="store_true", help="print the report as JSON")
    test.add_argument(
        "--timeout", type=_positive_number, default=None, help="seconds per probe (default: limits.timeout_s)"
    )
    test.set_defaults(func=_test_connection)


def _add_tenants(commands: _Commands) -> None:
    """`tenants validate`."""
    tenants = commands.add_parser("tenants", help="work with tenant configuration files")
    tenant_commands = commands.nested(tenants, "tenants_command")
    validate = tenant_commands.add_parser(
        "validate", help="check tenant files with the worker's own rules; say which secret references resolve here"
    )
    validate.add_argument(
        "paths",
        type=_given_path,
        nargs="*",
        metavar="PATH",
        help="tenant files or directories (default: the tenants dir)",
    )
    validate.add_argument("--json", action="store_true", help="print JSON (for CI)")
    validate.set_defaults(func=_validate_tenants)


def _add_dlq(commands: _Commands) -> None:
    """`dlq list|show|replay|purge`."""
    dlq = commands.add_parser("dlq", help="list, show, replay or purge dead letters ({namespace}.dead)")
    dlq_commands = commands.nested(dlq, "dlq_command")
    dlq_list = dlq_commands.add_parser(
        "list", help="a table of dead letters: id, request id, tenant, task, reason, attempts, age"
    )
    dlq_list.add_argument(
        "--limit", type=_positive_int, default=1000, help="look at most at this many (default: %(default)s)"
    )
    dlq_list.add_argument("--json", action="store_true", help="print JSON instead of a table")
    dlq_show = dlq_commands.add_parser("show", help="one dead letter's properties, headers and body (secrets masked)")
    dlq_show.add_argument("id", metavar="NAME", help="a dead letter's ID, request id, or unique ID prefix")
    dlq_show.add_argument("--json", action="store_true", help="print JSON")
    dlq_replay = dlq_commands.add_parser(
        "replay", help="publish dead letters back to {namespace}.requests; each is removed once the copy is confirmed"
    )
    dlq_replay.add_argument(
        "ids", nargs="*", metavar="ID", help="dead letters to replay: IDs, request ids or unique ID prefixes"
    )
    dlq_replay.add_argument("--all", action="store_true", help="replay every dead letter")
    dlq_replay.add_argument(
        "--keep-attempts", action="store_true", help="keep the attempt count instead of starting from zero"
    )
    _add_header_key_flags(
        dlq_replay,
        "the workers' --header-key: signs the copies' raised atlas-settle-seq, so the replay's reply outranks "
        "the one its dead letter was answered with",
    )
    dlq_purge = dlq_commands.add_parser("purge", help="delete dead letters (all, unless IDs or filters are given)")
    dlq_purge.add_argument("ids", nargs="*", metavar="ID", help="delete only these (IDs, request ids, ID prefixes)")
    dlq_purge.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    for sub in (dlq_list, dlq_show, dlq_replay, dlq_purge):
        _add_broker_flags(sub)
        sub.set_defaults(func=_dlq)
    for sub in (dlq_list, dlq_replay, dlq_purge):
        sub.add_argument("--tenant", help="only this tenant's dead letters")
        sub.add_argument("--task", help="only this task (rca, runbook, summary, chat, test_connection)")
        sub.add_argument("--reason", help="only this reason (e.g. exhausted, malformed, delivery_limit)")
    dlq_show.set_defaults(tenant=None, task=None, reason=None)


def _add_topology(commands: _Commands) -> None:
    """`topology declare|definitions`, with the flags of `run` that shape the topology."""
    topology = commands.add_parser("topology", help="declare the broker topology, or print it as RabbitMQ definitions")
    topology_commands = commands.nested(topology, "topology_command")
    topology_declare = topology_commands.add_parser("declare", help="declare every exchange, queue and binding")
    topology_definitions = topology_commands.add_parser(
        "definitions", help="print RabbitMQ definitions JSON (for rabbitmqctl import_definitions)"
    )
    topology_definitions.add_argument("--vhost", default="/", help="virtual host to write (default: %(default)s)")
    for sub in (topology_declare, topology_definitions):
        _add_broker_flags(sub)
        # The same flags and defaults as `run`, which shape the same topology.
        sub.add_argument("--atlas-cloud-exchange", default=WorkerSettings.atlas_cloud_exchange)
        sub.add_argument("--delivery-limit", type=_positive_int, default=WorkerSettings.delivery_limit)
        _add_ladder_flags(sub, helped=False)
        sub.set_defaults(func=_topology)


def _whole_number(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None


def _number(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):  # nan compares false to every bound, and inf makes no delay or timeout
        raise argparse.ArgumentTypeError(f"{text} is not a finite number")
    return value


Number = TypeVar("Number", int, float)


def _checked(parse: Callable[[str], Number], fits: Callable[[Number], bool], why: str) -> Callable[[str], Number]:
    """An argparse type: `parse`, then refuse a value that does not fit, saying `why` after the text given."""

    def check(text: str) -> Number:
        value = parse(text)
        if not fits(value):
            raise argparse.ArgumentTypeError(f"{text} {why}")
        return value

    return check


_positive_int = _checked(_whole_number, lambda v: v > 0, "is not a positive number")
_non_negative_int = _checked(_whole_number, lambda v: v >= 0, "is negative")
_port = _checked(_whole_number, lambda v: 0 <= v <= 65535, "is not a TCP port (0 to 65535)")
_positive_number = _checked(_number, lambda v: v > 0, "is not a positive number")
_non_negative_number = _checked(_number, lambda v: v >= 0, "is negative")
_share = _checked(_number, lambda v: 0 < v <= 1, "is not a share above 0 and at most 1 (0.5 is half)")
_growth = _checked(_number, lambda v: v >= 1, "is below 1: each retry level must wait at least as long as the last")


def _given_path(text: str) -> Path:
    if not text.strip():  # `--tenants "$UNSET"`: as a path it would be the working directory
        raise argparse.ArgumentTypeError("is empty")
    return Path(text)


def _loop_name(text: str) -> str:
    if text not in LOOPS:
        raise argparse.ArgumentTypeError(f"{text!r} is not one of {', '.join(LOOPS)}")
    return text


def _cidr(text: str) -> str:
    try:
        return str(ipaddress.ip_network(text, strict=False))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a CIDR such as 10.0.0.0/8") from None


def _run(args: argparse.Namespace) -> int:
    from worker.app import WorkerApp

    try:
        settings = WorkerSettings(
            amqp_url=args.amqp_url,
            tenants_dir=args.tenants or env_tenants_dir(),
            namespace=args.namespace,
            prefetch=args.prefetch,
            atlas_cloud_exchange=args.atlas_cloud_exchange,
            grace_s=args.grace,
            delivery_limit=args.delivery_limit,
            ladder=RetryLadder(args.retry_base, args.retry_factor, args.retry_levels),
            metrics_port=args.metrics_port,
            metrics_host=args.metrics_host,
            breaker=BreakerPolicy(
                failure_rate=args.breaker_failure_rate,
                min_calls=args.breaker_min_calls,
                window_s=args.breaker_window,
                cooldown_s=args.breaker_cooldown,
                probes=args.breaker_probes,
            ),
            **_security_settings(args),
            max_response_bytes=args.max_response_bytes,
            allow_draft_cidrs=tuple(args.allow_draft_cidrs),
            freeze_heap=True,
        )
    except ValueError as exc:  # a combination of flags that no single flag's check could refuse
        raise StartupError(ExitCode.USAGE, str(exc)) from None

    async def main() -> None:
        app = WorkerApp(settings)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            # The first signal drains; a second one returns in-flight work to the queue at once.
            loop.add_signal_handler(sig, lambda: app.stop(force=app.stopping))
        await app.run()

    runtime.run(main(), loop=args.loop, gc_threshold=args.gc_threshold)
    return ExitCode.OK


def _test_connection(args: argparse.Namespace) -> int:
    """Exit 0 when the provider is usable (maybe with warnings), 1 when it is not, 2 when the file is invalid."""
    from worker.connection_check.drafts import DraftError, check_tenant, load_draft, load_stored
    from worker.connection_check.requirements import render

    try:
        tenant = load_draft(args.config) if args.config else load_stored(args.tenants or env_tenants_dir(), args.tenant)
    except DraftError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return ExitCode.USAGE
    report = asyncio.run(check_tenant(tenant, args.timeout))
    print(report.model_dump_json(indent=2) if args.json else render(report))
    return ExitCode.FAILED if report.verdict == "not_ready" else ExitCode.OK


def _validate_tenants(args: argparse.Namespace) -> int:
    """Exit 0 when every file is valid, 1 otherwise. Secret references are resolved in this process's own
    environment and reported as resolving or not; their values are never printed."""
    from worker.secrets import reference_status
    from worker.tenants import secret_fields

    files: list[dict[str, Any]] = []
    for path in args.paths or [env_tenants_dir()]:
        configs, problems = validate_path(path)
        for config in configs:
            references = {name: reference_status(secret) for name, secret in secret_fields(config)}
            files.append(
                {
                    "file": str(path if path.suffix == ".toml" else path / f"{config.tenant_id}.toml"),
                    "tenant_id": config.tenant_id,
                    "valid": True,
                    "provider": config.provider.kind,
                    "fallback": config.fallback.policy.value,
                    "references": references,
                }
            )
        by_file: dict[str, list[str]] = {}
        for problem in problems:
            by_file.setdefault(str(problem.path), []).append(f"{problem.field}: {problem.message}".lstrip(": "))
        files.extend({"file": name, "valid": False, "errors": errors} for name, errors in by_file.items())
    invalid = sum(not f["valid"] for f in files)
    if args.json:
        print(json.dumps({"valid": len(files) - invalid, "invalid": invalid, "files": files}, indent=2))
    else:
        for entry in files:
            if entry["valid"]:
                print(f"ok    {entry['file']}  ({entry['provider']}, fallback {entry['fallback']})")
                for name, status in entry["references"].items():
                    print(f"      {name}: {status}")
            else:
                for error in entry["errors"]:
                    print(f"error {entry['file']}: {error}")
        print(f"{len(files) - invalid} valid, {invalid} invalid")
    return ExitCode.FAILED if invalid else ExitCode.OK


def _dlq(args: argparse.Namespace) -> int:
    from worker.ops.commands import dlq_command

    return dlq_command(args)


def _topology(args: argparse.Namespace) -> int:
    from worker.ops.commands import topology_command

    return topology_command(args)


def _log_as_json(log_format: str | None) -> bool:
    # A person at a terminal reads console lines; anything else (a file, a pipe, a log shipper) gets JSON.
    return log_format == "json" if log_format else not sys.stderr.isatty()


def _check_amqp_url(args: argparse.Namespace) -> None:
    """Before any command uses the broker URL: one that does not parse would fail deep in the AMQP library, with a
    traceback quoting the part of the password it took for a port."""
    url = getattr(args, "amqp_url", None)
    if url is not None and (problem := amqp_url_problem(url)) is not None:
        raise StartupError(ExitCode.USAGE, f"{problem} (from --amqp-url or AMQP_URL)")
    if url is not None:
        remember_url_credentials(url)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(
        getattr(args, "log_level", LOG_LEVEL_DEFAULT), json=_log_as_json(getattr(args, "log_format", None))
    )
    try:
        _check_amqp_url(args)
        code: int = args.func(args)
    except StartupError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return exc.code
    except SettingsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return ExitCode.USAGE
    except KeyboardInterrupt:  # Ctrl-C in a command that has no signal handling of its own (`run` has)
        print("interrupted", file=sys.stderr)
        return ExitCode.INTERRUPTED
    return code


if __name__ == "__main__":
    sys.exit(main())
