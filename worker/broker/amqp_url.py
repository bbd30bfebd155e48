"""The broker URL: checked before anything uses it, and the AMQP user a connection made with it logs in as."""

from yarl import URL

# aiormq's PLAIN login when the URL names no user (its password defaults to `guest` too).
DEFAULT_LOGIN = "guest"
SCHEMES = ("amqp", "amqps")
RESERVED_IN_PASSWORD = (
    "percent-encode reserved characters in the password ('/' as %2F, '#' as %23, '?' as %3F, '@' as %40)"
)


def amqp_url_problem(text: str) -> str | None:
    """Why `text` is not a usable broker URL, or None. Never quotes the URL: a password with an unescaped '/',
    '#', '?' or '@' moves the split between userinfo and host, so no part of it can be shown safely."""
    try:
        url = URL(text)
        url.port  # noqa: B018 -- yarl parses the port only when asked; a password's tail there is not a number
    except ValueError:
        return f"the AMQP URL does not parse: {RESERVED_IN_PASSWORD}"
    if url.scheme not in SCHEMES or not url.host:
        return "the AMQP URL must look like amqp://USER:PASSWORD@HOST:PORT/VHOST (or amqps://)"
    # The password's tail, cut off at an unescaped '/', '?' or '#', would land in the vhost, query or fragment.
    if "@" in url.raw_path or "@" in url.raw_query_string or url.raw_fragment:
        return f"the AMQP URL has an '@' after its host, or a fragment: {RESERVED_IN_PASSWORD}"
    return None


def login_user(amqp_url: str) -> str | None:
    """The AMQP user a connection to `amqp_url` is authenticated as, as the broker checks a message's `user_id`
    against it. None with `auth=external` and no user in the URL: the client certificate names the user."""
    url = URL(amqp_url)
    if url.query.get("auth", "plain").lower() == "external":
        return url.user or None
    return url.user or DEFAULT_LOGIN
