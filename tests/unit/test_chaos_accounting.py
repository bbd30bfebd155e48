"""The soak's accounting: lost, duplicated, inconsistent and leaked requests are each caught."""

import orjson

from chaos.accounting import account, canary_hits, observe_copy, observe_reply
from chaos.provider import FaultyProvider

POLICIES = {"closed": "fail_closed", "retry": "queue_and_retry", "cloud": "atlas_cloud"}


def reply(request_id: str, tenant: str, status: str = "ok", text: str = "answer", code: str | None = None) -> bytes:
    body: dict[str, object] = {"request_id": request_id, "tenant_id": tenant, "status": status}
    body["result"] = {"text": text} if status == "ok" else None
    if code:
        body["error"] = {"code": code, "message": "x"}
    return orjson.dumps(body)


def request(request_id: str, tenant: str) -> bytes:
    return orjson.dumps({"request_id": request_id, "tenant_id": tenant, "task": "summary"})


def test_one_reply_each_is_clean() -> None:
    result = account(
        {"r1": "closed", "r2": "retry"},
        POLICIES,
        [observe_reply(reply("r1", "closed"), "r1"), observe_reply(reply("r2", "retry"), "r2")],
    )
    assert (result.lost, result.inconsistent, result.duplicate_requests, result.cloud_leaks) == ([], [], 0, [])
    assert result.by_tenant["closed"]["ok"] == 1


def test_missing_request_is_lost() -> None:
    result = account({"r1": "closed", "r2": "closed"}, POLICIES, [observe_reply(reply("r1", "closed"), "r1")])
    assert result.lost == ["r2"]


def test_identical_duplicates_are_counted_but_consistent() -> None:
    same = observe_reply(reply("r1", "closed"), "r1")
    result = account({"r1": "closed"}, POLICIES, [same, observe_reply(reply("r1", "closed"), "r1")])
    assert result.duplicate_requests == 1
    assert result.duplicate_deliveries == 1
    assert result.inconsistent == []


def test_duplicates_with_different_answers_are_inconsistent() -> None:
    result = account(
        {"r1": "closed"},
        POLICIES,
        [
            observe_reply(reply("r1", "closed"), "r1"),
            observe_reply(reply("r1", "closed", "unavailable", code="timeout"), "r1"),
        ],
    )
    assert result.inconsistent == ["r1"]
    assert result.duplicates_differing == 1


def test_copies_that_fail_alike_but_name_different_last_errors_agree() -> None:
    result = account(
        {"r1": "retry"},
        POLICIES,
        [
            observe_reply(reply("r1", "retry", "failed", code="timeout"), "r1"),
            observe_reply(reply("r1", "retry", "failed", code="circuit_open"), "r1"),
        ],
    )
    assert result.inconsistent == []
    assert result.duplicates_other_error == 1


def test_failed_reply_with_dead_letter_is_one_outcome_but_dead_letter_with_answer_is_not() -> None:
    failed = observe_reply(reply("r1", "retry", "failed", code="timeout"), "r1")
    dead = observe_copy("dead", request("r1", "retry"), {"atlas-reason": "exhausted"})
    assert account({"r1": "retry"}, POLICIES, [failed, dead]).inconsistent == []
    answered = observe_reply(reply("r2", "retry"), "r2")
    dead2 = observe_copy("dead", request("r2", "retry"), {"atlas-reason": "exhausted"})
    assert account({"r2": "retry"}, POLICIES, [answered, dead2]).inconsistent == ["r2"]


def test_byoc_only_tenant_on_atlas_cloud_is_a_leak_but_atlas_cloud_tenant_is_not() -> None:
    result = account(
        {"r1": "closed", "r2": "cloud"},
        POLICIES,
        [
            observe_copy("cloud", request("r1", "closed"), {"atlas-reason": "transient"}),
            observe_copy("cloud", request("r2", "cloud"), {"atlas-reason": "transient"}),
        ],
    )
    assert result.cloud_leaks == ["r1"]


def test_wrong_correlation_id_and_unknown_ids_are_counted() -> None:
    result = account(
        {"r1": "closed"},
        POLICIES,
        [observe_reply(reply("r1", "closed"), "other"), observe_reply(reply("zz", "closed"), "zz")],
    )
    assert result.bad_correlation == 1
    assert result.unknown == 1


def test_canaries_are_found_anywhere_in_blobs() -> None:
    hits = canary_hits(["sk-a", "sk-b"], [b"log sk-a here", b"{'h': 'sk-a'}", b"clean"])
    assert hits == {"sk-a": 2, "sk-b": 0}


def test_a_prompts_fate_is_fixed_and_about_the_configured_share_fail() -> None:
    provider = FaultyProvider("key", fault_rate=0.3)
    fates = [provider.fate(f"prompt {i}") for i in range(2000)]
    assert fates == [provider.fate(f"prompt {i}") for i in range(2000)]
    faulty = sum(1 for kind, _ in fates if kind is not None)
    assert 450 < faulty < 750


def ranked(request_id: str, status: str, seq: int, redeliveries: int = 0, code: str | None = None) -> bytes:
    body = orjson.loads(reply(request_id, "retry", status, code=code))
    body["provenance"] = {"settle_seq": seq, "redeliveries": redeliveries}
    return orjson.dumps(body)


def test_a_forked_duplicate_is_explained_by_the_settle_sequence_and_the_later_history_counts() -> None:
    # The redelivered original (seq 0, redelivered) failed; its retry copy's history (seq 2) answered.
    stale = observe_reply(ranked("r1", "failed", 0, 1, code="circuit_open"), "r1")
    stale_dead = observe_copy("dead", request("r1", "retry"), {"atlas-reason": "circuit_open", "atlas-redeliveries": 1})
    later = observe_reply(ranked("r1", "ok", 2), "r1")
    result = account({"r1": "retry"}, POLICIES, [stale, stale_dead, later], healthy={"r1"})
    assert (result.duplicates_explained, result.duplicates_differing, result.inconsistent) == (1, 0, [])
    assert result.circuit_failed_healthy == []
    assert result.by_tenant["retry"]["ok"] == 1


def test_copies_that_differ_at_the_same_rank_are_unexplained() -> None:
    result = account(
        {"r1": "retry"},
        POLICIES,
        [observe_reply(ranked("r1", "ok", 1), "r1"), observe_reply(ranked("r1", "failed", 1, code="timeout"), "r1")],
    )
    assert result.duplicates_differing == 1
    assert result.inconsistent == ["r1"]


def test_a_healthy_request_ended_by_the_circuit_is_counted() -> None:
    failed = observe_reply(reply("r1", "retry", "failed", code="circuit_open"), "r1")
    doomed = observe_reply(reply("r2", "retry", "failed", code="circuit_open"), "r2")
    result = account({"r1": "retry", "r2": "retry"}, POLICIES, [failed, doomed], healthy={"r1"})
    assert result.circuit_failed_healthy == ["r1"]
