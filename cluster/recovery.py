"""When a pool call fails: is the replica lost, and may the story go on elsewhere?

Ray Serve restarts a replica that dies, and routes new calls to live replicas; it does not carry
a call that was running on the dead one. The ingress does that (``cluster/ingress.py``): it
retries the tokenizer call, sends pending renders again, and resumes the MLLM's stream from the
story's exact tokens. This module holds the policy, per story and per stage (pool):

- a *lost* replica (its actor died, its engine broke mid-story) counts against ``max_resumes``;
  one replica's death counts once even if several of the story's calls were on it;
- a *refused* call (a broken replica turned it away before starting, or no replica is up) costs
  nothing: the ingress waits ``pause_s`` and tries again;
- either way, if no replica answers within ``deadline_s`` of the failure, the stage is
  unavailable. So is one that lost more than ``max_resumes`` replicas.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TypeVar

from ray import exceptions as ray_errors
from ray.serve import exceptions as serve_errors

from actors.errors import PoolFailure

LOST, REFUSED, TIMED_OUT = "lost", "refused", "timed out"
T = TypeVar("T")


class StageUnavailable(Exception):
    """A pool cannot serve this story any more: the client gets UNAVAILABLE with this message."""


def cause(error: BaseException) -> BaseException:
    """The exception a replica raised, unwrapped from Ray's RayTaskError."""
    inner = getattr(error, "cause", None) if isinstance(error, ray_errors.RayTaskError) else None
    return inner if isinstance(inner, BaseException) else error


def failure_kind(error: BaseException) -> str | None:
    """LOST, REFUSED or TIMED_OUT if the call may be tried again elsewhere; None for any other error."""
    error = cause(error)
    if isinstance(error, PoolFailure):
        return REFUSED if error.refused else LOST
    if isinstance(
        error,
        (
            ray_errors.RayActorError,
            ray_errors.WorkerCrashedError,
            ray_errors.NodeDiedError,
            ray_errors.OwnerDiedError,
            serve_errors.ReplicaUnavailableError,
        ),
    ):
        return LOST
    if isinstance(error, serve_errors.DeploymentUnavailableError):
        return REFUSED
    if isinstance(error, TimeoutError):  # our own wait for a replica to come back
        return TIMED_OUT
    return None


async def within(awaitable: Awaitable[T], timeout: float | None) -> T:
    """Await, giving up with TimeoutError after ``timeout`` seconds (None: no limit)."""
    return await (asyncio.wait_for(awaitable, timeout) if timeout else awaitable)


def replica_key(error: BaseException) -> object:
    """What identifies the lost replica, so that its death counts once per story."""
    error = cause(error)
    return getattr(error, "replica", None) or getattr(error, "actor_id", None) or id(error)


@dataclass
class Recovery:
    """One story's losses, per stage."""

    max_resumes: int
    deadline_s: float
    pause_s: float = 1.0
    on_loss: Callable[[str], None] = lambda stage: None  # told of each newly lost replica
    lost: dict[str, set] = field(default_factory=dict)  # stage -> lost replicas
    failing_since: dict[str, float] = field(default_factory=dict)  # stage -> first failure not yet recovered

    async def after(self, stage: str, error: BaseException) -> float:
        """Account for a failed call. Re-raises an error that no retry can mend, raises
        StageUnavailable when the stage is out of chances, otherwise returns how long the next try
        may wait for a replica."""
        kind = failure_kind(error)
        if kind is None:
            raise error
        now = time.monotonic()
        since = self.failing_since.setdefault(stage, now)
        if kind == TIMED_OUT or now - since > self.deadline_s:
            raise StageUnavailable(f"{stage}: no replica answered within {self.deadline_s:.0f}s")
        lost, key = self.lost.setdefault(stage, set()), replica_key(error)
        if kind == LOST and key not in lost:
            lost.add(key)
            if len(lost) > self.max_resumes:
                raise StageUnavailable(f"{stage}: replica lost {len(lost)} times")
            self.on_loss(stage)
        else:  # refused, or the same dead replica again (Serve has not noticed yet): wait a little
            await asyncio.sleep(self.pause_s)
        return max(since + self.deadline_s - time.monotonic(), 0.001)

    async def call(self, stage: str, attempt: Callable[[float | None], Awaitable[T]]) -> T:
        """``await attempt(timeout)`` until it succeeds, as this policy allows. ``timeout`` is None on
        the first try, then how long the try may wait for a replica (see ``within``)."""
        timeout = None
        while True:
            try:
                result = await attempt(timeout)
            except Exception as e:  # CancelledError is not an Exception: cancellation passes through
                timeout = await self.after(stage, e)
                continue
            self.recovered(stage)
            return result

    def recovered(self, stage: str) -> None:
        """The stage answered again: the next failure starts a new deadline."""
        self.failing_since.pop(stage, None)

    @property
    def resumes(self) -> int:
        return sum(len(v) for v in self.lost.values())
