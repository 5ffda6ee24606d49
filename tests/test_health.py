"""The plain policies behind health checks and resumes, without a cluster (actors/health.py,
cluster/recovery.py); tests/test_faults.py runs them on the real service."""

from __future__ import annotations

import asyncio

import pytest
from ray import exceptions as ray_errors

from actors.errors import PoolFailure
from actors.health import Liveness
from cluster.recovery import Recovery, StageUnavailable, failure_kind


def test_a_worker_is_unhealthy_when_it_broke_or_sat_still_with_work(monkeypatch):
    clock = [100.0]
    monkeypatch.setattr("actors.health.time.monotonic", lambda: clock[0])
    live = Liveness("mllm", stall_s=10, replica="r1")
    clock[0] += 60
    live.check(pending=False)  # idle for a minute: nothing to make progress on
    live.work_arrived(was_idle=True)
    clock[0] += 9
    live.check(pending=True)
    clock[0] += 2
    with pytest.raises(RuntimeError, match="no progress for 11s"):
        live.check(pending=True)
    live.progressed()
    live.check(pending=True)
    failure = live.fail("engine step failed: ValueError")
    assert failure.replica == "r1" and not failure.refused
    with pytest.raises(RuntimeError, match="engine step failed"):
        live.check(pending=False)
    with pytest.raises(PoolFailure) as refused:
        live.refuse_if_broken()
    assert refused.value.refused


def _died(actor_id: str) -> ray_errors.ActorDiedError:
    err = ray_errors.ActorDiedError()
    err.actor_id = actor_id
    return err


def test_one_lost_replica_counts_once_and_refusals_cost_nothing():
    recovery = Recovery(max_resumes=1, deadline_s=60, pause_s=0)
    losses = []
    recovery.on_loss = losses.append

    async def run():
        await recovery.after("detokenizer", _died("a"))
        await recovery.after("detokenizer", _died("a"))  # the same replica, another of the story's renders
        await recovery.after("detokenizer", PoolFailure("detokenizer", "broken", refused=True))
        with pytest.raises(StageUnavailable, match="detokenizer: replica lost 2 times"):
            await recovery.after("detokenizer", _died("b"))

    asyncio.run(run())
    assert losses == ["detokenizer"] and recovery.resumes == 2


def test_errors_no_retry_can_mend_pass_through_and_the_deadline_ends_a_wait(monkeypatch):
    assert failure_kind(ValueError("bad")) is None
    assert failure_kind(PoolFailure("mllm", "x")) == "lost"
    clock = [0.0]
    monkeypatch.setattr("cluster.recovery.time.monotonic", lambda: clock[0])
    recovery = Recovery(max_resumes=3, deadline_s=30, pause_s=0)

    async def run():
        with pytest.raises(ValueError):
            await recovery.after("mllm", ValueError("bad"))
        assert await recovery.after("mllm", _died("a")) == pytest.approx(30)
        clock[0] = 31
        with pytest.raises(StageUnavailable, match="no replica answered within 30s"):
            await recovery.after("mllm", PoolFailure("mllm", "x", refused=True))

    asyncio.run(run())
