"""Rate limits: a token bucket per agent (verdicts ingested), per API token (calls), and per
source address for calls without valid credentials (enrollment, refused tokens).

``AuthInterceptor`` (auth.py) asks ``RateLimits`` before each call of a token holder, before
each batch of an agent's verdict stream, and before it refuses or enrolls a caller without
credentials (each such refusal would otherwise cost an audit entry). A refusal becomes
RESOURCE_EXHAUSTED with a one-line reason and, in trailing metadata (``auris-retry-after-ms``),
how long until the same request would pass. Buckets are lenient about size: a request larger
than the bucket is admitted when the bucket is full and leaves it in debt, so a batch bigger
than the burst still gets through (at the configured rate) instead of being refused for ever.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable

__all__ = ["RETRY_AFTER_KEY", "Decision", "KeyedBuckets", "RateLimits", "TokenBucket"]

# Trailing metadata of a rate-limit refusal: milliseconds until the request would be admitted.
RETRY_AFTER_KEY = "auris-retry-after-ms"
# Idle buckets are forgotten (they are full again anyway) once there are more than this many.
_MAX_KEYS = 10_000


@dataclasses.dataclass(frozen=True)
class Decision:
    admitted: bool
    # Seconds until the refused request would be admitted (0 when admitted).
    retry_after_s: float = 0.0
    # True for the first refusal after an admission: the one worth an audit entry.
    first_refusal: bool = False


class TokenBucket:
    """``rate`` tokens a second, at most ``burst`` saved up; starts full."""

    def __init__(self, rate: float, burst: float, now: float) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError("a token bucket needs a positive rate and a burst of at least 1")
        self.rate = rate
        self.burst = burst
        self._tokens = burst
        self._at = now
        self._refusing = False

    def _refill(self, now: float) -> None:
        if now > self._at:
            self._tokens = min(self.burst, self._tokens + (now - self._at) * self.rate)
            self._at = now

    def take(self, cost: float, now: float) -> Decision:
        """Admit a request of ``cost`` tokens, or say how long until it would be admitted."""
        self._refill(now)
        need = min(cost, self.burst)
        if self._tokens >= need:
            self._tokens -= cost
            self._refusing = False
            return Decision(True)
        first = not self._refusing
        self._refusing = True
        return Decision(False, (need - self._tokens) / self.rate, first)

    def full(self, now: float) -> bool:
        self._refill(now)
        return self._tokens >= self.burst


class KeyedBuckets:
    """One bucket per key (an agent id, an API token id), made on first use; rate 0: no limit."""

    def __init__(self, rate: float, burst: float, clock: Callable[[], float] = time.monotonic) -> None:
        if rate < 0:
            raise ValueError("a rate limit must not be negative")
        if rate > 0 and burst < 1:
            raise ValueError("a rate limit's burst must be at least 1")
        self.rate = rate
        self.burst = burst
        self._clock = clock
        self._buckets: dict[str, TokenBucket] = {}
        # Refused requests since start (the metrics report them).
        self.refused = 0

    def take(self, key: str, cost: float = 1.0) -> Decision:
        if self.rate == 0 or cost <= 0:
            return Decision(True)
        now = self._clock()
        bucket = self._buckets.get(key)
        if bucket is None:
            if len(self._buckets) >= _MAX_KEYS:
                self._forget_idle(now)
            bucket = self._buckets[key] = TokenBucket(self.rate, self.burst, now)
        decision = bucket.take(cost, now)
        if not decision.admitted:
            self.refused += 1
        return decision

    def _forget_idle(self, now: float) -> None:
        for key in [k for k, b in self._buckets.items() if b.full(now)]:
            del self._buckets[key]


class RateLimits:
    """The collector's limits: verdicts a second per agent, calls a second per API token, calls
    a second without valid credentials per source address."""

    def __init__(
        self,
        agent_rate: float,
        agent_burst: float,
        token_rate: float,
        token_burst: float,
        peer_rate: float = 0.0,
        peer_burst: float = 0.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.agents = KeyedBuckets(agent_rate, agent_burst, clock)
        self.tokens = KeyedBuckets(token_rate, token_burst, clock)
        self.peers = KeyedBuckets(peer_rate, peer_burst, clock)
