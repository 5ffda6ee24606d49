"""Structured decoding in vLLM: a logits processor that lets only grammar-legal tokens through.

Per request, ``SamplingParams.extra_args["seedstory"]`` carries the ``StoryRules`` fields;
requests without it are left alone. The grammar itself is ``actors.mllm.grammar``.
"""

from __future__ import annotations

import torch
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor, MoveDirectionality

from actors.config import from_dict
from actors.mllm.grammar import CHOICES, SCRIPTED, GrammarState, StoryRules, allowed_ids, choices, start_state
from actors.tokenizer.text import TokenLayout

EXTRA_KEY = "seedstory"


def choice_masks(layout: TokenLayout, device=None) -> dict[str, torch.Tensor]:
    """One boolean "may come next" mask over the vocabulary per grammar choice, built once."""
    masks = {}
    for choice in choices(layout):
        masks[choice] = torch.zeros(layout.vocab_size, dtype=torch.bool, device=device)
        masks[choice][allowed_ids(layout, choice)] = True
    return masks


def mask_for(masks: dict[str, torch.Tensor], choice: str) -> torch.Tensor:
    """The mask of ``choice``: one of ``choice_masks``, or made on the spot for a scripted caption's
    token (one per vocabulary entry would be too many to build ahead)."""
    if not choice.startswith(SCRIPTED):
        return masks[choice]
    any_mask = masks[CHOICES[0]]
    mask = torch.zeros_like(any_mask)
    mask[int(choice.removeprefix(SCRIPTED))] = True
    return mask


class Tracked:
    """A request's grammar state and the live list of its sampled tokens."""

    def __init__(self, state: GrammarState, output: list[int]):
        self.state, self.output, self.seen = state, output, 0

    def catch_up(self) -> str:
        for token in self.output[self.seen :]:
            self.state.advance(token)
        self.seen = len(self.output)
        return self.state.allowed()


class StoryGrammarProcessor(LogitsProcessor):
    @classmethod
    def validate_params(cls, params) -> None:
        extra = (params.extra_args or {}).get(EXTRA_KEY)
        if extra is not None:
            StoryRules(**extra)  # raises ValueError with the reason

    def __init__(self, vllm_config, device: torch.device, is_pin_memory: bool):
        self.layout = from_dict(TokenLayout, vllm_config.model_config.hf_config.seedstory_tokens)
        self.masks = choice_masks(self.layout, device)
        self.tracked: dict[int, Tracked] = {}

    def is_argmax_invariant(self) -> bool:
        return False

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        if batch_update is None:
            return
        for index in batch_update.removed:
            self.tracked.pop(index, None)
        for index, params, prompt, output in batch_update.added:
            extra = (params.extra_args or {}).get(EXTRA_KEY)
            self.tracked.pop(index, None)
            if extra is not None:
                state = start_state(StoryRules(**extra), self.layout, list(prompt or []))
                self.tracked[index] = Tracked(state, output)
        for src, dst, direction in batch_update.moved:
            moving, displaced = self.tracked.pop(src, None), self.tracked.pop(dst, None)
            if moving is not None:
                self.tracked[dst] = moving
            if displaced is not None and direction == MoveDirectionality.SWAP:
                self.tracked[src] = displaced

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        for index, tracked in self.tracked.items():
            mask = mask_for(self.masks, tracked.catch_up())
            logits[index, : mask.shape[0]].masked_fill_(~mask, float("-inf"))
            logits[index, mask.shape[0] :] = float("-inf")  # padded vocabulary rows, if any
        return logits
