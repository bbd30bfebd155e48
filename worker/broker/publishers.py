"""Who may publish what: optional rules on the AMQP user, the tenants it may name, and allowed reply_to names.

RabbitMQ refuses a publish whose `user_id` property is not the connection's own user, so once rules are set
`user_id` says who published; a request without one, from a user not listed, for a tenant its user may not
name, or with a `reply_to` matching no allowed pattern is refused (rejected and dead-lettered). The worker's
own user is the exception to the user and tenant rules: its copies (retries, deferrals, replays) carry it,
and the broker lets no other connection claim it. Nothing else a message carries, headers included, counts."""

import fnmatch
from dataclasses import dataclass, field

ANY_TENANT = "*"


@dataclass(frozen=True)
class PublisherRules:
    """`users` maps an AMQP user to the tenant ids it may publish for (`*`: any); empty means no restriction.
    `reply_to` holds shell-style patterns (`replies-*`); empty means any name."""

    users: dict[str, frozenset[str]] = field(default_factory=dict)
    reply_to: tuple[str, ...] = ()

    @classmethod
    def parse(cls, users: list[str], reply_to: list[str]) -> "PublisherRules":
        """From `--publisher USER=TENANT[,TENANT…]` and `--reply-to PATTERN` flags."""
        parsed: dict[str, frozenset[str]] = {}
        for rule in users:
            user, _, tenants = rule.partition("=")
            names = frozenset(t.strip() for t in tenants.split(",") if t.strip())
            if not user.strip() or not names:
                raise ValueError(f"publisher rule {rule!r}: expected USER=TENANT[,TENANT…] (or USER=*)")
            parsed[user.strip()] = parsed.get(user.strip(), frozenset()) | names
        return cls(parsed, tuple(reply_to))

    @property
    def active(self) -> bool:
        return bool(self.users or self.reply_to)

    def refusal(
        self, user_id: str | None, tenant_id: str | None, reply_to: str | None, *, worker_user: str | None = None
    ) -> str | None:
        """Why this publish is not allowed, or None when it is. `worker_user` is the AMQP user the worker
        publishes its copies as (None: unknown, so nothing passes for the worker's)."""
        if (refused := self.sender_refusal(user_id, tenant_id, worker_user=worker_user)) is not None:
            return refused
        if reply_to is not None and not self.reply_to_allowed(reply_to):
            return "reply_to is not one of the names the worker's --reply-to rules allow"
        return None

    def sender_refusal(
        self, user_id: str | None, tenant_id: str | None, *, worker_user: str | None = None
    ) -> str | None:
        """Why this user may not publish, or not for `tenant_id`, or None. Asked of every message, a request or
        not; `tenant_id` None (a body that names none) checks the user alone."""
        if not self.users or (worker_user and user_id == worker_user):
            return None
        allowed = self.users.get(user_id or "")
        if allowed is None:
            return "the message's user_id is not a publisher allowed by the worker's --publisher rules"
        if tenant_id is not None and ANY_TENANT not in allowed and tenant_id not in allowed:
            return "this publisher may not send requests for this tenant"
        return None

    def reply_to_allowed(self, reply_to: str) -> bool:
        if not self.reply_to:
            return True
        # fnmatchcase: the same on every platform; `isprintable` keeps control characters out of names.
        return reply_to.isprintable() and any(fnmatch.fnmatchcase(reply_to, p) for p in self.reply_to)
