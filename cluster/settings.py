"""The Serve application's settings: ``ray_config.yaml``'s application args, checked once.

``AppSettings`` is the schema both sides read: ``cluster/app.py`` builds the pools from it and
``cluster/ingress.py`` serves by it (the ingress gets the args again, as plain data, and checks
them here). It lives apart from the builder so that the ingress need not import the module that
imports the ingress. The request limits it carries are ``cluster/requests.py``'s ``StoryLimits``.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from actors.config import SAMPLERS
from actors.mllm.sink import SinkSettings
from cluster.requests import StoryLimits

ROOT = Path(__file__).resolve().parent.parent  # the project root: relative checkpoints are taken from it


@dataclass(frozen=True)
class AppSettings:
    checkpoint: str  # relative paths are taken from the project root
    sink: SinkSettings = field(default_factory=SinkSettings)
    limits: StoryLimits = field(default_factory=StoryLimits)
    max_stories_per_replica: int = 8  # admission: beyond it, RESOURCE_EXHAUSTED
    auth_token: str = ""  # non-empty: require "authorization: Bearer <token>"
    auth_token_env: str = ""  # or: the environment variable that holds the token
    engine_max_stories: int = 8  # stories one MLLM replica batches (vLLM max_num_seqs)
    kv_blocks: int | None = None  # KV blocks per MLLM replica (default: what memory allows)
    torch_threads: int = 1  # per tokenizer / de-tokenizer replica
    max_resumes: int = 3  # replicas of one pool a story may lose and go on
    resume_deadline_s: float = 180.0  # wait at most this for a replica after a loss
    health_stall_s: float = 120.0  # a pool busy this long without progress is unhealthy
    exact_renders: bool = True  # a picture's PNG depends on its codes and seed only
    render_slots: int = 1  # pictures per de-tokenizer call, at one fixed shape (exact renders)
    sampler: str = "dpm++"  # euler | dpm++ | unipc
    guidance_until: float = 0.5  # the fraction of the steps that run classifier-free guidance

    def __post_init__(self) -> None:
        if self.auth_token and self.auth_token_env:
            raise ValueError("give auth_token or auth_token_env, not both")
        if self.max_stories_per_replica < 1 or self.engine_max_stories < 1 or self.torch_threads < 1:
            raise ValueError("max_stories_per_replica, engine_max_stories and torch_threads must be >= 1")
        if self.max_resumes < 0 or self.resume_deadline_s <= 0 or self.health_stall_s <= 0:
            raise ValueError("max_resumes must be >= 0, resume_deadline_s and health_stall_s > 0")
        if self.render_slots < 1 or self.sampler not in SAMPLERS or not 0 < self.guidance_until <= 1:
            raise ValueError(f"need render_slots >= 1, sampler in {SAMPLERS} and 0 < guidance_until <= 1")
        path = Path(self.checkpoint)
        object.__setattr__(self, "checkpoint", str(path if path.is_absolute() else ROOT / path))

    def token(self) -> str:
        """The bearer token clients must send ("" = none). Read from the replica's environment when
        ``auth_token_env`` names a variable, so that the token never sits in the config (on
        Kubernetes it comes from a Secret); a named variable that is unset fails the replica's start
        rather than serving without auth."""
        if not self.auth_token_env:
            return self.auth_token
        value = os.environ.get(self.auth_token_env, "")
        if not value:
            raise ValueError(
                f"auth_token_env: the environment variable {self.auth_token_env} is unset or empty"
            )
        return value

    @classmethod
    def from_args(cls, args: dict) -> AppSettings:
        args = dict(args)
        unknown = set(args) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown application args: {sorted(unknown)}")
        args["sink"] = SinkSettings(**args.get("sink", {}))
        args["limits"] = StoryLimits(**args.get("limits", {}))
        return cls(**args)

    def to_args(self) -> dict:
        return asdict(self)

    @property
    def max_story_segments(self) -> int:
        """Longest story an engine request may hold (EngineConfig.max_story_segments): the earlier
        segments a request may carry, the opening, and the new segments it may ask for."""
        return self.limits.max_story_so_far + 1 + self.limits.max_segments
