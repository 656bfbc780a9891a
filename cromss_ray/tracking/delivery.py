"""MLflow writes that outlive a tracking-server outage (docs/reliability.md, training and tracking).

A training run must not stop, nor lose an epoch, because the tracking server restarts.
:class:`DeliveryQueue` keeps every write (metrics, params, tags, artifacts) in order and
sends them as soon as the server answers: a write that fails for a reason that can pass
(no connection, a timeout, a 5xx answer) stays queued, with every write after it, and is
tried again after a backoff that doubles up to a bound; a write the server refuses (a 4xx
answer, a bad value) is dropped from the queue and raises at once, since sending it again
cannot help. The training
loop never waits while the server is away; :meth:`DeliveryQueue.flush` waits at most a
given time at the end and then raises :class:`UndeliveredError` naming what was not sent.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import requests

logger = logging.getLogger(__name__)

FIRST_BACKOFF_S = 1.0
MAX_BACKOFF_S = 30.0
LISTED_WRITES = 20
"""How many undelivered writes an :class:`UndeliveredError` names (all are counted)."""


class UndeliveredError(RuntimeError):
    """Writes still queued when the time to deliver them ran out; ``writes`` names each of them."""

    def __init__(self, destination: str, writes: list[str], waited_s: float, last_error: BaseException | None) -> None:
        self.destination, self.writes, self.waited_s, self.last_error = destination, writes, waited_s, last_error
        listed = "; ".join(writes[:LISTED_WRITES])
        if len(writes) > LISTED_WRITES:
            listed += f"; and {len(writes) - LISTED_WRITES} more"
        super().__init__(
            f"{destination}: {len(writes)} write(s) not delivered after waiting {waited_s:.0f} s "
            f"(tracking.flush_timeout_s): {listed}. Last error: {last_error}"
        )

    def __reduce__(self) -> tuple[type, tuple[str, list[str], float, BaseException | None]]:
        """Pickled whole, as it travels from a Ray Train worker to the controller."""
        return (type(self), (self.destination, self.writes, self.waited_s, self.last_error))


def is_transient(error: BaseException) -> bool:
    """Whether sending again may succeed: no connection, a timeout, an OS-level error, or a 5xx answer.

    MLflow loads here, at the first failed write, not with the module: the Train controller
    imports this module for :class:`UndeliveredError` alone (:mod:`cromss_ray.train.cluster`).
    """
    from mlflow.exceptions import MlflowException

    if isinstance(error, MlflowException):
        return error.get_http_status_code() >= 500
    if isinstance(error, requests.HTTPError):
        return error.response is None or error.response.status_code >= 500
    return isinstance(error, (requests.RequestException, OSError))


@dataclass
class _Write:
    description: str
    send: Callable[[], object]


class DeliveryQueue:
    """Writes sent in order, kept while the destination is away (module docstring).

    ``clock`` and ``sleep`` are the monotonic clock and the sleep used for the backoff, which
    doubles from :data:`FIRST_BACKOFF_S` up to ``max_backoff_s``.
    """

    def __init__(
        self,
        destination: str,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
        max_backoff_s: float = MAX_BACKOFF_S,
    ) -> None:
        self.destination = destination
        self._first_backoff = min(FIRST_BACKOFF_S, max_backoff_s)
        self._max_backoff = max_backoff_s
        self._clock = clock
        self._sleep = sleep
        self._pending: deque[_Write] = deque()
        self._backoff = self._first_backoff
        self._unreachable = False
        self._next_attempt = 0.0
        self.last_error: BaseException | None = None

    @property
    def pending(self) -> list[str]:
        """The descriptions of the writes not yet delivered, oldest first."""
        return [write.description for write in self._pending]

    def put(self, description: str, send: Callable[[], object]) -> None:
        """Queue ``send`` (one write, described for the error message) and deliver what the backoff allows."""
        self._pending.append(_Write(description, send))
        self.deliver()

    def deliver(self) -> bool:
        """Send queued writes in order until one fails transiently (it stays first) or none is left; no
        attempt before the backoff has passed. True when nothing is left."""
        if self._pending and self._clock() < self._next_attempt:
            return False
        while self._pending:
            write = self._pending[0]
            try:
                write.send()
            except Exception as error:
                if not is_transient(error):
                    self._pending.popleft()
                    raise
                self._wait_longer(error)
                return False
            self._pending.popleft()
            self._backoff = self._first_backoff
            self._unreachable = False
        return True

    def flush(self, timeout_s: float) -> None:
        """Deliver everything, waiting at most ``timeout_s`` seconds; :class:`UndeliveredError` if writes remain."""
        started = self._clock()
        deadline = started + timeout_s
        self._next_attempt = min(self._next_attempt, started)
        while not self.deliver():
            now = self._clock()
            if now >= deadline:
                raise UndeliveredError(self.destination, self.pending, now - started, self.last_error)
            self._next_attempt = min(self._next_attempt, deadline)
            self._sleep(max(0.0, self._next_attempt - now))

    def _wait_longer(self, error: BaseException) -> None:
        if not self._unreachable:
            self._unreachable = True
            logger.warning(
                "%s unreachable (%s); %d write(s) kept and sent again when it answers",
                self.destination,
                error,
                len(self._pending),
            )
        self.last_error = error
        self._next_attempt = self._clock() + self._backoff
        self._backoff = min(2 * self._backoff, self._max_backoff)
