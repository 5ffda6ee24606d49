"""What Serve's ``check_health`` asks a pool replica: did its worker break, or stop moving?

Serve calls ``check_health`` on every replica every ``health_check_period_s`` (ray_config.yaml) and
replaces a replica whose check raises. Ray already replaces a replica whose process died; these
cover the failures it cannot see: an engine thread that raised (the replica still answers, but
can no longer write), or one that hangs with work waiting. Plain Python, no torch.

``Faults`` is a test-only hook: with ``SEEDSTORY_TEST_FAULTS=1`` in a replica's environment, a
test may arm it to make the worker's n-th next step raise: in the MLLMPool as a broken engine
would, in the DetokenizerPool as a failed render.
"""

from __future__ import annotations

import os
import time

from actors.errors import PoolFailure


class Liveness:
    def __init__(self, stage: str, stall_s: float, replica: str = ""):
        self.stage, self.stall_s, self.replica = stage, stall_s, replica
        self.broken = ""  # why the worker can no longer work ("" = it can)
        self.progress_at = time.monotonic()  # last step finished, or work arrived at an idle worker

    def work_arrived(self, was_idle: bool) -> None:
        if was_idle:  # an idle worker made no progress because it had none to make
            self.progress_at = time.monotonic()

    def progressed(self) -> None:
        self.progress_at = time.monotonic()

    def fail(self, reason: str) -> PoolFailure:
        """Mark the worker broken; returns the error for the work it held."""
        self.broken = reason
        return PoolFailure(self.stage, reason, False, self.replica)

    def refuse_if_broken(self) -> None:
        """A broken replica refuses new work at once, so the caller goes elsewhere without waiting."""
        if self.broken:
            raise PoolFailure(self.stage, f"replica out of service ({self.broken})", True, self.replica)

    def check(self, pending: bool) -> None:
        """Raises (Serve then replaces the replica) if the worker broke, or sat for stall_s with work."""
        if self.broken:
            raise RuntimeError(f"{self.stage}: {self.broken}")
        still = time.monotonic() - self.progress_at
        if pending and still > self.stall_s:
            raise RuntimeError(f"{self.stage}: no progress for {still:.0f}s with work pending")


class Faults:
    """Test-only: ``arm(n)`` makes the n-th next ``tick`` raise. Off unless SEEDSTORY_TEST_FAULTS=1."""

    def __init__(self):
        self.enabled = os.environ.get("SEEDSTORY_TEST_FAULTS") == "1"
        self.countdown = 0

    def arm(self, steps: int) -> None:
        if not self.enabled:
            raise PermissionError("fault injection is off (SEEDSTORY_TEST_FAULTS is not 1 on this replica)")
        self.countdown = steps

    def tick(self) -> None:
        if self.countdown:
            self.countdown -= 1
            if not self.countdown:
                raise RuntimeError("injected fault (test)")
