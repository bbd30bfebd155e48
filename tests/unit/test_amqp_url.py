"""The broker URL as operators write it: the user the worker logs in as, and passwords that need escaping."""

import pytest

from worker.broker.amqp_url import amqp_url_problem, login_user


@pytest.mark.parametrize(
    ("url", "user"),
    [
        ("amqp://guest:guest@127.0.0.1:5672/", "guest"),
        ("amqp://atlas-worker:pw@broker/", "atlas-worker"),
        ("amqp://atlas%40prod:p%2Fw@broker/vhost", "atlas@prod"),  # the broker sees the decoded name
        ("amqp://broker/", "guest"),  # the AMQP library logs in as guest when the URL names no one
        ("amqps://atlas-worker@broker/?auth=external", "atlas-worker"),
        ("amqps://broker/?auth=EXTERNAL", None),  # the client certificate names the user
    ],
)
def test_the_user_a_connection_logs_in_as(url: str, user: str | None) -> None:
    assert login_user(url) == user


@pytest.mark.parametrize(
    "url",
    [
        "amqp://guest:guest@127.0.0.1:5672/",
        "amqps://atlas:s3cr%2Ft%23X%40Y%3FZ@broker.internal:5671/prod?heartbeat=30",
        "amqp://broker/",
        "amqp://guest:s3cr@tXYZ@broker/",  # the last '@' ends the userinfo, as yarl and urllib read it
    ],
)
def test_well_formed_urls_have_no_problem(url: str) -> None:
    assert amqp_url_problem(url) is None


@pytest.mark.parametrize("password", ["s3cr/tXYZ", "s3cr#tXYZ", "s3cr?tXYZ", "1234/tXYZ", "1234#tXYZ", "1234?tXYZ"])
def test_an_unescaped_reserved_character_in_the_password_is_named_without_quoting_it(password: str) -> None:
    problem = amqp_url_problem(f"amqp://guest:{password}@127.0.0.1:5672/")

    assert problem is not None
    assert "percent-encode reserved characters in the password" in problem
    assert "tXYZ" not in problem


def test_a_url_that_is_not_amqp_is_refused() -> None:
    assert amqp_url_problem("http://guest:guest@127.0.0.1:5672/") is not None
    assert amqp_url_problem("127.0.0.1:5672") is not None
