"""`python -m chaos [--mode healing|keyed] [--requests N] [--rate R]`: the soak, then its accounting; exits 1
if an invariant fails."""

import argparse
import asyncio
import sys
import tempfile
from collections import Counter
from pathlib import Path

from bench.stats import table
from chaos import soak
from chaos.accounting import account, canary_hits


def report(result: soak.SoakResult) -> bool:
    accounting = account(result.published, soak.TENANTS, result.observations, result.healthy)
    hits = canary_hits(result.canaries.values(), result.blobs)
    leaked = sum(hits.values())
    left = sum(result.left_in_queues.values())
    sinks = {kind: sum(1 for o in result.observations if o.sink == kind) for kind in ("reply", "dead", "cloud")}
    faults = sum(n for kind, n in result.provider_answers.items() if kind not in ("ok", "unauthorized"))
    calls = sum(result.provider_answers.values())

    print("\n## Outcomes by tenant (first terminal outcome of each request)")
    rows = []
    for tenant, policy in soak.TENANTS.items():
        counts = accounting.by_tenant.get(tenant, Counter())
        rows.append([tenant, policy, ", ".join(f"{label}: {n}" for label, n in sorted(counts.items()))])
    print(table(["tenant", "policy", "outcomes"], rows))

    print("\n## Chaos applied")
    print(
        table(
            ["what", "count"],
            [
                ["requests published", str(len(result.published))],
                ["provider calls (all tenants)", str(calls)],
                [
                    "provider faults injected (5xx, 429, hang, garbage)",
                    f"{faults} ({100 * faults / max(calls, 1):.0f} %): "
                    + ", ".join(f"{k} {v}" for k, v in sorted(result.provider_answers.items()) if k != "ok"),
                ],
                ["worker kill -9 + restart", str(result.kills)],
                ["broker connection cuts", str(result.cuts)],
                ["tenant-source faults (dir unmounted, file with bad bytes)", str(result.source_faults)],
                ["workers consuming side by side", "2"],
                [
                    "messages seen: replies / dead letters / atlas-cloud",
                    f"{sinks['reply']} / {sinks['dead']} / {sinks['cloud']}",
                ],
                ["wall time", f"{result.wall_s:.0f} s"],
            ],
        )
    )

    checks = [
        ("every request has a terminal outcome (0 lost)", len(accounting.lost) == 0, f"{len(accounting.lost)} lost"),
        (
            "exactly one authoritative outcome per request",
            not accounting.inconsistent,
            f"{len(accounting.inconsistent)} with differing outcomes",
        ),
        (
            "0 healthy requests failed on circuit grounds",
            not accounting.circuit_failed_healthy,
            f"{len(accounting.circuit_failed_healthy)} of {len(result.healthy)} fated to succeed",
        ),
        (
            "duplicates: 0 unexplained (identical / explained by settle_seq)",
            accounting.duplicates_differing == 0,
            f"{accounting.duplicate_requests} requests had {accounting.duplicate_deliveries} duplicate deliveries:"
            f" {accounting.duplicates_identical} identical ({accounting.duplicates_other_error} naming another"
            f" last error), {accounting.duplicates_explained} explained, {accounting.duplicates_differing}"
            " unexplained",
        ),
        ("nothing left in requests/retry queues", left == 0, f"{left} left"),
        (
            "0 fail_closed/queue_and_retry messages on atlas-cloud",
            not accounting.cloud_leaks,
            f"{len(accounting.cloud_leaks)} seen",
        ),
        ("reply correlation_id = request_id", accounting.bad_correlation == 0, f"{accounting.bad_correlation} wrong"),
        ("no messages for unknown request ids", accounting.unknown == 0, f"{accounting.unknown} seen"),
        (
            "0 canary secrets in logs, replies, headers, metrics",
            leaked == 0,
            f"{leaked} hits in {len(result.blobs)} blobs ({result.metrics_scraped} metrics scrapes)",
        ),
        (
            "both workers consumed again after the last cut, without a restart",
            len(result.settled_after_last_cut) == 2 and all(result.settled_after_last_cut),
            "requests settled after it: " + " / ".join(map(str, result.settled_after_last_cut)),
        ),
        (
            "each tenant's key reached its provider (the canaries were in use)",
            all(result.keys_used.values()),
            ", ".join(t for t, ok in result.keys_used.items() if not ok) or "all tenants",
        ),
        (
            "≥ 3 kills and ≥ 2 connection cuts happened",
            result.kills >= 3 and result.cuts >= 2,
            f"{result.kills} kills, {result.cuts} cuts",
        ),
    ]
    print("\n## Invariants")
    print(
        table(
            ["invariant", "result", "detail"], [[name, "PASS" if ok else "FAIL", detail] for name, ok, detail in checks]
        )
    )
    if accounting.lost:
        print(f"lost (first 10): {accounting.lost[:10]}")
    if accounting.inconsistent:
        print(f"inconsistent (first 10): {accounting.inconsistent[:10]}")
    print(f"\nlogs and tenant files: {result.logs}")
    return all(ok for _, ok, _ in checks)


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m chaos", description=__doc__)
    parser.add_argument("--requests", type=int, default=5000)
    parser.add_argument("--rate", type=float, default=100.0, help="requests published per second")
    parser.add_argument(
        "--mode",
        choices=["healing", "keyed"],
        default="healing",
        help="healing: retried faulty requests heal after 1-2 calls; keyed: a faulty request fails every call",
    )
    parser.add_argument(
        "--breaker-cooldown",
        type=float,
        default=None,
        help="seconds an open circuit waits (worker flag; default 1 in healing mode, the worker's own in keyed)",
    )
    parser.add_argument("--logs", type=Path, default=None, help="where worker logs go (default: a temp dir)")
    args = parser.parse_args()
    logs = args.logs or Path(tempfile.mkdtemp(prefix="chaos-"))
    logs.mkdir(parents=True, exist_ok=True)
    keyed = args.mode == "keyed"
    cooldown = args.breaker_cooldown if args.breaker_cooldown is not None or keyed else 1.0
    print(
        f"chaos soak ({args.mode}): {args.requests} requests at {args.rate:g}/s, tenants {', '.join(soak.TENANTS)}",
        flush=True,
    )
    result = asyncio.run(soak.run(args.requests, args.rate, logs, cooldown, keyed=keyed))
    ok = report(result)
    print("\nALL INVARIANTS HOLD" if ok else "\nINVARIANT VIOLATED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
