"""Publisher restriction rules as the flags give them: users, their tenants, allowed reply_to names."""

import pytest

from worker.broker.publishers import PublisherRules


def test_restriction_rules_are_read_from_flags() -> None:
    rules = PublisherRules.parse(["svc-a=acme,globex", "svc-b=*"], ["replies-*", "amq.gen-*"])
    assert rules.refusal("svc-a", "acme", "replies-1") is None
    assert rules.refusal("svc-b", "anyone", None) is None
    assert rules.refusal(None, "acme", None) is not None
    assert rules.refusal("svc-a", "initech", None) is not None
    assert rules.refusal("svc-a", "acme", "someone-elses-queue") is not None
    assert rules.refusal("svc-a", "acme", "replies-1\nx") is not None


def test_no_rules_means_no_restriction() -> None:
    assert PublisherRules().refusal(None, "anyone", "anything") is None
    assert PublisherRules.parse([], []).refusal(None, "anyone", "anything") is None


@pytest.mark.parametrize("bad", ["no-equals", "=acme", "svc="])
def test_a_malformed_rule_is_an_error(bad: str) -> None:
    with pytest.raises(ValueError, match="expected USER=TENANT"):
        PublisherRules.parse([bad], [])


WORKER = "atlas-worker"


def test_the_workers_own_copies_are_admitted_for_any_tenant() -> None:
    rules = PublisherRules.parse(["svc-a=acme"], [])
    # A retry, deferral or replay the worker published: the broker vouches that only its user could have.
    assert rules.refusal(WORKER, "acme", None, worker_user=WORKER) is None
    assert rules.refusal(WORKER, "initech", None, worker_user=WORKER) is None


def test_the_workers_user_is_no_exemption_from_the_reply_to_patterns() -> None:
    rules = PublisherRules.parse(["svc-a=acme"], ["replies-*"])
    assert rules.refusal(WORKER, "acme", "replies-1", worker_user=WORKER) is None
    assert rules.refusal(WORKER, "acme", "someone-elses-queue", worker_user=WORKER) is not None


def test_listed_publishers_are_checked_as_before_beside_the_worker() -> None:
    rules = PublisherRules.parse(["svc-a=acme"], [])
    assert rules.refusal("svc-a", "acme", None, worker_user=WORKER) is None
    assert rules.refusal("svc-a", "initech", None, worker_user=WORKER) is not None
    assert rules.refusal("svc-b", "acme", None, worker_user=WORKER) is not None


@pytest.mark.parametrize("user_id", [None, "", "Atlas-Worker", "atlas-worker "])
def test_only_the_workers_exact_user_is_the_worker(user_id: str | None) -> None:
    rules = PublisherRules.parse(["svc-a=acme"], [])
    assert rules.refusal(user_id, "acme", None, worker_user=WORKER) is not None


def test_with_no_known_worker_user_nothing_passes_for_the_worker() -> None:
    rules = PublisherRules.parse(["svc-a=acme"], [])
    assert rules.refusal(None, "acme", None, worker_user=None) is not None
    assert rules.refusal("", "acme", None, worker_user="") is not None


def test_a_message_naming_no_tenant_is_judged_by_its_user_alone_and_one_naming_a_tenant_by_both() -> None:
    rules = PublisherRules.parse(["svc-a=acme", "svc-b=*"], ["replies-*"])

    assert rules.sender_refusal("svc-a", None) is None
    assert rules.sender_refusal("svc-a", "acme") is None
    assert rules.sender_refusal("svc-b", "initech") is None
    assert rules.sender_refusal("svc-a", "initech") == "this publisher may not send requests for this tenant"
    assert rules.sender_refusal("svc-c", None) is not None
    assert rules.sender_refusal(None, None) is not None
    assert rules.sender_refusal("svc-c", "acme", worker_user="svc-c") is None
