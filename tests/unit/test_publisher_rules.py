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
