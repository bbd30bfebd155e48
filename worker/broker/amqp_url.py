"""The broker URL: the AMQP user a connection made with it logs in as."""

from yarl import URL

# aiormq's PLAIN login when the URL names no user (its password defaults to `guest` too).
DEFAULT_LOGIN = "guest"


def login_user(amqp_url: str) -> str | None:
    """The AMQP user a connection to `amqp_url` is authenticated as, as the broker checks a message's `user_id`
    against it. None with `auth=external` and no user in the URL: the client certificate names the user."""
    url = URL(amqp_url)
    if url.query.get("auth", "plain").lower() == "external":
        return url.user or None
    return url.user or DEFAULT_LOGIN
