"""The training loop every stage shares, run inside Ray Train workers.

A stage is a module with four plain functions (see ``training/stages/``):

    init(spec)                      -> {name: nn.Module}   trainable parts, built from spec.ckpt
    batches(shard, spec)            -> iterator of batches  (from the Ray Data shard)
    loss(models, batch, spec, step) -> (loss tensor, {metric: float})
    export(parts, spec, metrics)    -> writes its parts into the checkpoint layout

This module holds what is common: threads and seeds, restoring from
``ray.train.get_checkpoint()``, gradient averaging across ranks, the optimiser and its
schedule, logging, and reporting checkpoints through ``ray.train.report``. A run resumed
under the same name continues at the step of its last checkpoint.
"""

from __future__ import annotations

import importlib
import math
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

STAGES = ("visual", "vae", "detokenizer", "opening", "mllm", "sink")
DEFAULT_STAGES = STAGES[:5]  # the sink stage is asked for by name (docs/training.md#the-sink-stage)
STATE_FILE = "state.pt"


@dataclass(frozen=True)
class StageSpec:
    """Everything a worker needs, as plain data (it travels to the workers as a dict)."""

    stage: str
    ckpt: str  # the checkpoint being built: stages read earlier parts from it
    steps: int
    batch_size: int  # per worker
    lr: float
    warmup: int = 50
    weight_decay: float = 0.0
    checkpoint_every: int = 100
    log_every: int = 25
    seed: int = 0
    threads: int = 1  # torch intra-op threads per worker
    sink: dict | None = None  # the sink stage: the SinkSettings (as a dict) whose contexts it trains on
    # The sink stage: the share of its steps that read whole stories densely, as the mllm stage
    # reads its windows (mixed in so that the contexts the sink adds do not erase the dense ones).
    dense_share: float = 0.0

    def __post_init__(self) -> None:
        if self.stage not in STAGES:
            raise ValueError(f"unknown stage {self.stage!r}; choose from {STAGES}")
        if not 0.0 <= self.dense_share <= 1.0:
            raise ValueError(f"dense_share must be in [0, 1], got {self.dense_share}")
        if min(self.steps, self.batch_size, self.checkpoint_every, self.log_every, self.threads) < 1:
            raise ValueError(
                f"{self.stage}: steps, batch_size, checkpoint_every, log_every, threads must be >= 1"
            )

    def to_dict(self) -> dict:
        return asdict(self)


def stage_module(stage: str):
    return importlib.import_module(f"training.stages.{stage}")


def lr_at(spec: StageSpec, step: int) -> float:
    """Linear warm-up, then cosine decay to a tenth."""
    if step < spec.warmup:
        return spec.lr * (step + 1) / spec.warmup
    progress = (step - spec.warmup) / max(1, spec.steps - spec.warmup)
    return spec.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def train_worker(config: dict) -> None:
    """The per-worker function TorchTrainer runs."""
    import ray.train
    import torch
    from ray.train.torch import get_device

    spec = StageSpec(**config["spec"])
    stage = stage_module(spec.stage)
    rank, device = ray.train.get_context().get_world_rank(), get_device()
    torch.set_num_threads(spec.threads)
    torch.manual_seed(spec.seed)  # the same init on every rank (rank 0's is broadcast anyway)
    parts = {k: m.to(device) for k, m in stage.init(spec).items()}
    params = [p for m in parts.values() for p in m.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=spec.lr, weight_decay=spec.weight_decay)
    step = start = restore(trainable(parts), opt)
    broadcast(params)
    torch.manual_seed(spec.seed + 1000 * rank + step)  # noise and dropout differ per rank and per resume
    batches = stage.batches(ray.train.get_dataset_shard("train"), spec)
    log = _Log(spec, step, rank == 0)
    while step < spec.steps:
        for g in opt.param_groups:
            g["lr"] = lr_at(spec, step)
        loss, metrics = stage.loss(parts, to_device(next(batches), device), spec, step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        all_reduce_grads(params)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        step += 1
        log.add({"loss": float(loss.detach()), **metrics, "step": step})
        if step % spec.checkpoint_every == 0 or step == spec.steps:
            report(trainable(parts), opt, step, {**log.mean(), "start_step": start}, rank == 0)


def trainable(parts: dict) -> dict:
    """The parts with trainable parameters: only these go into checkpoints (frozen ones reload from
    spec.ckpt)."""
    return {k: m for k, m in parts.items() if any(p.requires_grad for p in m.parameters())}


def to_device(batch, device):
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    return batch.to(device) if hasattr(batch, "to") else batch


def broadcast(params: list) -> None:
    """Start every rank from rank 0's weights."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        for p in params:
            dist.broadcast(p.data, 0)


def all_reduce_grads(params: list) -> None:
    """Average gradients over ranks in one flat buffer. Done by hand rather than with DDP because
    stages call several methods of a model (encode, decode, ...), while DDP syncs only through forward."""
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    offset = 0
    for p, g in zip(params, grads):
        p.grad = flat[offset : offset + g.numel()].view_as(g)
        offset += g.numel()


def restore(parts: dict, opt) -> int:
    """Load the latest reported checkpoint, if this run has one; returns its step (else 0)."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return 0
    with checkpoint.as_directory() as folder:
        state = load_state(folder, parts)
    opt.load_state_dict(state["optimizer"])
    return int(state["step"])


def load_state(checkpoint_dir: str | Path, parts: dict) -> dict:
    """Load a reported checkpoint's weights into ``parts``; returns the whole saved state."""
    import torch

    state = torch.load(Path(checkpoint_dir) / STATE_FILE, map_location="cpu", weights_only=True)
    for name, module in parts.items():
        module.load_state_dict(state["models"][name])
    return state


def report(parts: dict, opt, step: int, metrics: dict, rank0: bool) -> None:
    """Every worker reports (Ray Train needs all ranks); rank 0 attaches the checkpoint."""
    import ray.train
    import torch

    with tempfile.TemporaryDirectory() as folder:
        checkpoint = None
        if rank0:
            state = {
                "step": step,
                "optimizer": opt.state_dict(),
                "models": {k: m.state_dict() for k, m in parts.items()},
            }
            torch.save(state, Path(folder) / STATE_FILE)
            checkpoint = ray.train.Checkpoint.from_directory(folder)
        ray.train.report({**metrics, "step": step}, checkpoint=checkpoint)


def load_parts(stage: str, spec: StageSpec, checkpoint_dir: str | Path) -> dict:
    """The trained parts of a finished run, rebuilt on the driver for export."""
    parts = stage_module(stage).init(spec)
    load_state(checkpoint_dir, trainable(parts))
    return parts


class _Log:
    """Running means of the metrics since the last line; rank 0 prints a line every log_every steps."""

    def __init__(self, spec: StageSpec, step: int, enabled: bool):
        self.spec, self.enabled, self.started, self.first_step = spec, enabled, time.time(), step
        self.sums: dict[str, float] = {}
        self.count = 0  # steps summed since the last line
        self.last: dict[str, float] = {}

    def add(self, metrics: dict) -> None:
        for k, v in metrics.items():
            if k != "step":
                self.sums[k] = self.sums.get(k, 0.0) + v
        self.count += 1
        step = metrics["step"]
        if step % self.spec.log_every == 0 or step == self.spec.steps:
            self.last = self._flush(step)

    def mean(self) -> dict:
        return self.last if not self.count else self._flush(None)

    def _flush(self, step: int | None) -> dict:
        means = {k: v / max(1, self.count) for k, v in self.sums.items()}
        self.sums, self.count = {}, 0
        if step is not None and self.enabled:
            rate = (step - self.first_step) / max(1e-9, time.time() - self.started)
            shown = " ".join(f"{k} {v:.4g}" for k, v in means.items())
            print(
                f"[{self.spec.stage}] step {step}/{self.spec.steps} {shown} ({rate:.2f} steps/s)", flush=True
            )
        return means
