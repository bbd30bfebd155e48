"""The broker URL as operators write it: the user the worker logs in as."""

import pytest

from worker.broker.amqp_url import login_user


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
