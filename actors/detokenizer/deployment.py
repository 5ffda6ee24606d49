"""DetokenizerPool: the Serve deployment that renders visual codes to PNG with the SDXL pipeline.

``render`` takes one picture's codes; ``@serve.batch`` gathers pictures from concurrent stories
into one worker-thread call (grouped by (steps, guidance)); with ``exact_renders`` (the default)
each picture still gets its own pipeline call, so that its PNG depends on its codes and seed
only. The pipeline runs on a worker thread so that the replica keeps answering while it denoises.
"""

from __future__ import annotations

import asyncio
import time
from itertools import groupby

import torch
from ray import serve
from ray.util import metrics

from actors.checkpoint import part_dir
from actors.detokenizer.model import Detokenizer
from actors.health import Faults, Liveness
from actors.imageio import to_png


# Replicas, resources, autoscaling, max_ongoing_requests and health checks: ray_config.yaml.
@serve.deployment(name="DetokenizerPool")
class DetokenizerPool:
    def __init__(self, checkpoint: str, threads: int = 1, stall_s: float = 120.0, exact: bool = True):
        torch.set_num_threads(threads)
        self.model = Detokenizer.from_pretrained(part_dir(checkpoint, "detokenizer"))
        self.liveness = Liveness("detokenizer", stall_s)
        self.busy = 0  # pipeline calls running
        self.exact = exact
        self.faults = Faults()
        self.m_batch = metrics.Histogram("seedstory_render_batch_size", "pictures per pipeline call",
                                         boundaries=[1, 2, 4, 8])
        self.m_seconds = metrics.Histogram("seedstory_render_seconds", "pipeline call time",
                                           boundaries=[0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10])

    @serve.batch(max_batch_size=4, batch_wait_timeout_s=0.01)
    async def render(self, jobs: list[dict]) -> list[dict]:
        """Each job: {"codes": [Q ints], "steps": int, "guidance": float, "seed": int}.
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
                results[i] = {"png": to_png(img), "width": img.width, "height": img.height,
                              "start": start, "end": end, "batch": len(idx)}
        return [results[i] for i in range(len(jobs))]

    async def check_health(self) -> None:
        """Serve replaces this replica if a pipeline call hangs for stall_s."""
        self.liveness.check(pending=self.busy > 0)

    def arm_fault(self, calls: int = 1) -> None:
        """Test-only (SEEDSTORY_TEST_FAULTS=1): the calls-th next pipeline call raises."""
        self.faults.arm(calls)

    def _render(self, jobs: list[dict], steps: int, guidance: float) -> list:
        """Exact: one picture per pipeline call. Batched float kernels round differently for other
        batch sizes (tiny, CPU: pixels off by 1 in ~0.03% of values), so only then is a picture a
        function of its codes and seed alone, and a render sent again after a lost replica gives
        the same PNG bytes. Not exact: one call for the batch, faster (tiny, 1 thread: 4 pictures
        0.84 s against 1.33 s one by one)."""
        self.faults.tick()
        codes, seeds = [job["codes"] for job in jobs], [job["seed"] for job in jobs]
        if not self.exact:
            return self.model.render_seeded(codes, seeds, steps, guidance)
        return [self.model.render_seeded([c], [s], steps, guidance)[0] for c, s in zip(codes, seeds)]
