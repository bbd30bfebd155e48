"""The retry ladder: delay levels growing exponentially, each a broker queue with a fixed TTL."""

from dataclasses import dataclass


@dataclass(frozen=True)
class RetryLadder:
    """Level `n` holds a message for `base_s * factor**n` seconds (defaults: 1 s … about 10 min)."""

    base_s: float = 1.0
    factor: float = 2.5
    levels: int = 8

    def __post_init__(self) -> None:
        if self.base_s <= 0 or self.factor < 1 or not 1 <= self.levels <= 30:
            raise ValueError("retry ladder needs base_s > 0, factor >= 1 and 1..30 levels")

    @property
    def delays_s(self) -> tuple[float, ...]:
        return tuple(self.base_s * self.factor**n for n in range(self.levels))

    def span_s(self, attempts: int) -> float:
        """How long a request that fails `attempts` times in a row spends parked on the ladder."""
        return sum(self.delays_s[self.level_for(n)] for n in range(1, attempts))

    def ttl_ms(self, level: int) -> int:
        return round(self.delays_s[level] * 1000)

    def level_for(self, attempts: int, retry_after_s: float | None = None) -> int:
        """Backoff level after `attempts` failed tries; a provider's Retry-After can only push it later."""
        level = min(max(attempts - 1, 0), self.levels - 1)
        if retry_after_s is not None:
            for candidate, delay in enumerate(self.delays_s):
                if delay >= retry_after_s:
                    return max(level, candidate)
            return self.levels - 1
        return level
