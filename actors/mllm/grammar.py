"""The story grammar as a plain state machine over token ids (no torch).

A story is: caption, ``<img>``, exactly Q visual tokens, ``</img>``, caption, ... and after
the requested number of pictures, ``</s>``. Captions hold 1..max_caption_tokens text tokens;
visual tokens appear only inside pictures. The vLLM logits processor and the reference
decoder in tests both ask this module what may come next.
"""

from __future__ import annotations

from dataclasses import dataclass

from actors.tokenizer.text import TokenLayout

# What may come next: one of these names (the logits processor keeps one mask for each).
CAPTION_FIRST = "caption_first"  # text only: a caption has at least one token
CAPTION = "caption"  # text or <img>
BOI = "boi"  # only <img>: the caption reached its maximum length
VISUAL = "visual"  # only visual tokens
EOI = "eoi"  # only </img>: Q visual tokens written
EOS = "eos"  # only </s>: all pictures written
CHOICES = (CAPTION_FIRST, CAPTION, BOI, VISUAL, EOI, EOS)


@dataclass(frozen=True)
class StoryRules:
    num_queries: int  # Q
    segments: int  # pictures to write in this request
    max_caption_tokens: int

    def __post_init__(self) -> None:
        if self.segments < 1:
            raise ValueError(f"segments must be >= 1, got {self.segments}")
        if self.num_queries < 1 or self.max_caption_tokens < 1:
            raise ValueError("num_queries and max_caption_tokens must be >= 1")


@dataclass
class GrammarState:
    rules: StoryRules
    layout: TokenLayout
    pictures: int = 0  # pictures completed by this request
    in_picture: bool = False
    run: int = 0  # tokens in the current caption or picture

    def allowed(self) -> str:
        rules = self.rules
        if self.in_picture:
            return EOI if self.run == rules.num_queries else VISUAL
        if self.pictures == rules.segments:
            return EOS
        if self.run == 0:
            return CAPTION_FIRST
        return BOI if self.run >= rules.max_caption_tokens else CAPTION

    def advance(self, token: int) -> None:
        """Consume one token; raises if the grammar forbids it (a bug or a forced token)."""
        if not permits(self.layout, self.allowed(), token):
            raise ValueError(f"token {token} breaks the story grammar (expected {self.allowed()})")
        layout = self.layout
        if token == layout.boi:
            self.in_picture, self.run = True, 0
        elif token == layout.eoi:
            self.in_picture, self.run, self.pictures = False, 0, self.pictures + 1
        elif token != layout.eos:
            self.run += 1


def permits(layout: TokenLayout, choice: str, token: int) -> bool:
    lo, hi = layout.text_range
    text = lo <= token < hi
    return {
        CAPTION_FIRST: text,
        CAPTION: text or token == layout.boi,
        BOI: token == layout.boi,
        VISUAL: layout.is_visual(token),
        EOI: token == layout.eoi,
        EOS: token == layout.eos,
    }[choice]


def allowed_ids(layout: TokenLayout, choice: str) -> list[int]:
    """Every token id the choice permits (the logits processor turns this into a mask)."""
    return [i for i in range(layout.vocab_size) if permits(layout, choice, i)]


def start_state(rules: StoryRules, layout: TokenLayout, prompt: list[int]) -> GrammarState:
    """The state after the prompt. The prompt is whole segments, optionally followed by the
    opening caption of the next one. That caption is the client's: the picture comes next.
    Pictures in the prompt don't count towards ``rules.segments``."""
    tail = prompt[max((i for i, tok in enumerate(prompt) if tok == layout.eoi), default=-1) + 1 :]
    caption = [tok for tok in tail if tok not in (layout.bos, layout.eos, layout.pad)]
    if layout.boi in caption or any(layout.is_visual(tok) for tok in caption):
        raise ValueError("the prompt ends inside a picture; end it with whole segments or a caption")
    return GrammarState(rules, layout, run=rules.max_caption_tokens if caption else 0)
