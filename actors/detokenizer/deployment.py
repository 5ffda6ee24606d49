"""DetokenizerPool: the Serve deployment that renders pictures' features to PNG with the SDXL pipeline.

``render`` takes one picture's features (Q, D); ``@serve.batch`` gathers pictures from concurrent stories
into one worker-thread call per (steps, guidance) group. How a group is rendered decides whether
a picture depends on its batch (a render sent again after a lost replica must be the same PNG):
- exact, ``render_slots`` > 1 (the default): one call of exactly ``render_slots`` rows, unused rows
  padded. At one shape no kernel mixes rows, so a picture depends on its features and seed only, once
  the start-up self-test has shown that it does not depend on its slot either;
- exact, one slot (or the self-test failed): one pipeline call per picture;
- not exact: one call for the group at its own size (its pixels may differ by 1 between batches).
The pipeline runs on a worker thread so that the replica keeps answering while it denoises.
"""

from __future__ import annotations

import asyncio
import logging
import time
from itertools import groupby

import torch
from ray import serve
from ray.util import metrics

from actors.checkpoint import part_dir
from actors.detokenizer.model import Detokenizer
from actors.health import Faults, Liveness
from actors.imageio import to_png

logger = logging.getLogger("ray.serve")


# Replicas, resources, autoscaling, max_ongoing_requests and health checks: ray_config.yaml.
@serve.deployment(name="DetokenizerPool")
class DetokenizerPool:
    def __init__(
        self,
        checkpoint: str,
        threads: int,
        stall_s: float,
        exact: bool,
        slots: int,
        sampler: str,
        guidance_until: float,
    ):
        """The arguments are ``cluster/settings.py``'s ``AppSettings``, where their defaults live."""
        torch.set_num_threads(threads)
        self.model = Detokenizer.from_pretrained(part_dir(checkpoint, "detokenizer"))
        self.model.use_sampler(sampler)
        self.guidance_until = guidance_until
        self.liveness = Liveness("detokenizer", stall_s)
        self.busy = 0  # pipeline calls running
        self.exact = exact
        self.slots = self.checked_slots(slots) if exact else slots
        self.render.set_max_batch_size(slots)  # a batch is at most one call's rows
        self.faults = Faults()
        self.m_batch = metrics.Histogram(
            "seedstory_render_batch_size", "pictures per pipeline call", boundaries=[1, 2, 4, 8]
        )
        self.m_seconds = metrics.Histogram(
            "seedstory_render_seconds", "pipeline call time", boundaries=[0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10]
        )

    @serve.batch(max_batch_size=4, batch_wait_timeout_s=0.01)
    async def render(self, jobs: list[dict]) -> list[dict]:
        """Each job: {"features": (Q, D) float32 array, "steps": int, "guidance": float, "seed": int}.
        Returns {"png", "width", "height", "start", "end", "batch"} per job, in order."""
        results: dict[int, dict] = {}
        order = sorted(range(len(jobs)), key=lambda i: (jobs[i]["steps"], jobs[i]["guidance"]))
        for (steps, guidance), group in groupby(order, key=lambda i: (jobs[i]["steps"], jobs[i]["guidance"])):
            idx = list(group)
            start = time.time()
            self.liveness.work_arrived(was_idle=not self.busy)
            self.busy += 1
            try:
                images = await asyncio.to_thread(self._render, [jobs[i] for i in idx], steps, guidance)
            finally:
                self.busy -= 1
                self.liveness.progressed()
            end = time.time()
            self.m_batch.observe(len(idx))
            self.m_seconds.observe(end - start)
            for i, img in zip(idx, images):
                results[i] = {
                    "png": to_png(img),
                    "width": img.width,
                    "height": img.height,
                    "start": start,
                    "end": end,
                    "batch": len(idx),
                }
        return [results[i] for i in range(len(jobs))]

    def checked_slots(self, slots: int) -> int:
        """``slots`` if a canary renders byte-identically in every slot, else 1 (said in the log)."""
        if slots <= 1:
            return 1
        failure = self.model.slot_self_test(slots, self.guidance_until)
        if failure:
            logger.warning("render slots self-test failed (%s): rendering one picture per call", failure)
            return 1
        logger.info("render slots self-test passed: %d pictures per call at one fixed shape", slots)
        return slots

    async def check_health(self) -> None:
        """Serve replaces this replica if a pipeline call hangs for stall_s."""
        self.liveness.check(pending=self.busy > 0)

    def arm_fault(self, calls: int = 1) -> None:
        """Test-only (SEEDSTORY_TEST_FAULTS=1): the calls-th next pipeline call raises."""
        self.faults.arm(calls)

    def _render(self, jobs: list[dict], steps: int, guidance: float) -> list:
        """One group's pictures, as the module docstring says (exact: a picture is a function of its
        features and seed alone; tiny, CPU, one thread: pixels differ by 1 in ~0.03% of values between
        batch sizes, never between slots of one size)."""
        self.faults.tick()
        features, seeds = [job["features"] for job in jobs], [job["seed"] for job in jobs]
        until = self.guidance_until
        if not self.exact:
            return self.model.render_seeded(features, seeds, steps, guidance, until)
        if self.slots > 1:
            return self.model.render_in_slots(features, seeds, self.slots, steps, guidance, until)
        return [
            self.model.render_seeded([f], [s], steps, guidance, until)[0] for f, s in zip(features, seeds)
        ]
