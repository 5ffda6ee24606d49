"""What one ``seedstory eval`` run is asked for: ``EvalSettings``, the one place the eval's defaults
live (the command line passes only what it is given). Its own module, because generating, judging,
reporting and the command line all read it and none of them should import another for it."""

from __future__ import annotations

from dataclasses import dataclass, field

from actors.mllm.sink import MODES, SinkSettings

CAPTIONS = ("written", "given")


@dataclass(frozen=True)
class EvalSettings:
    """How many held-out stories and segments, which sink modes, and how stories are sampled and
    pictures rendered: the same in every mode, so the modes differ only in their attention."""

    stories: int = 50
    segments: int = 25
    modes: tuple[str, ...] = MODES
    # Rendered as the service renders by default (ray_config.yaml: default_steps, default_guidance,
    # sampler, guidance_until), so the eval judges the pictures a user gets.
    steps: int = 6  # denoising steps per picture
    guidance: float = 5.0  # classifier-free guidance: the tiny de-tokenizer draws its characters with it
    sampler: str = "dpm++"
    guidance_until: float = 0.5  # the fraction of the steps that run guidance
    seed: int = 0
    temperature: float = 0.7
    top_p: float = 0.9
    kv_cache_bytes: int = 1 << 30
    # Every mode's sink tokens, window and neighbourhoods (`seedstory eval` takes them from the
    # Serve config, as serve does); its mode is unused: the eval runs each of ``modes``. Its
    # window also says when a character counts as returning.
    sink: SinkSettings = field(default_factory=SinkSettings)
    # Also judge the real pictures' features: rendered (one more render pass) and by the tokenizer's decoder.
    ceiling: bool = True
    # "written": the model writes every caption after the opening. "given": each held-out story's
    # own captions are given (the engine's script) and the model draws them, so every mode draws
    # the same comings and goings, and every return of the held-out stories is judged in every mode.
    captions: str = "written"

    def __post_init__(self) -> None:
        bad = [mode for mode in self.modes if mode not in MODES]
        if bad or self.stories < 2 or self.segments < 1:
            raise ValueError(f"eval: modes must be among {MODES}, stories >= 2, segments >= 1 (got {bad})")
        if self.captions not in CAPTIONS:
            raise ValueError(f"eval: captions must be one of {CAPTIONS}, got {self.captions!r}")
