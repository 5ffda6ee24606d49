"""The story grammar as a plain state machine over token ids (no torch).

A story is: caption, ``<img>``, the Q query tokens in order, ``</img>``, caption, ... and after
the requested number of pictures, ``</s>``. Captions hold 1..max_caption_tokens text tokens.
Inside a picture nothing is chosen: the query tokens and ``</img>`` are forced (the picture is
read off the hidden states at the query positions, not sampled). The vLLM logits processor and
the reference decoder in tests both ask this module what may come next.
"""

from __future__ import annotations

from dataclasses import dataclass

from actors.tokenizer.text import TokenLayout

# What may come next: one of these names (the logits processor keeps one mask for each).
CAPTION_FIRST = "caption_first"  # text only: a caption has at least one token
CAPTION = "caption"  # text or <img>
BOI = "boi"  # only <img>: the caption reached its maximum length
EOI = "eoi"  # only </img>: the Q query tokens written
EOS = "eos"  # only </s>: all pictures written
CHOICES = (CAPTION_FIRST, CAPTION, BOI, EOI, EOS)
QUERY = "query_"  # + row j: only the query token of row j
SCRIPTED = "scripted_"  # + a token id: only that token (a caption given in the rules' script)


def choices(layout: TokenLayout) -> tuple[str, ...]:
    """Every choice the grammar can make over this vocabulary: one per query row besides CHOICES."""
    return CHOICES + tuple(f"{QUERY}{row}" for row in range(layout.num_queries))


@dataclass(frozen=True)
class StoryRules:
    num_queries: int  # Q
    segments: int  # pictures to write in this request
    max_caption_tokens: int
    # Captions given in advance: script[k] is the caption of this request's picture k+1 (the
    # first picture's caption ends the prompt). The model writes the pictures, and the captions
    # after the script's. An eval uses it to ask every sink mode for the same comings and goings.
    script: tuple[tuple[int, ...], ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "script", tuple(tuple(caption) for caption in self.script))
        if self.segments < 1:
            raise ValueError(f"segments must be >= 1, got {self.segments}")
        if self.num_queries < 1 or self.max_caption_tokens < 1:
            raise ValueError("num_queries and max_caption_tokens must be >= 1")
        if len(self.script) > self.segments - 1:
            raise ValueError(f"a script of {len(self.script)} captions for {self.segments} pictures")
        if any(not 0 < len(caption) <= self.max_caption_tokens for caption in self.script):
            raise ValueError(f"every scripted caption needs 1..{self.max_caption_tokens} tokens")


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
            return EOI if self.run == rules.num_queries else f"{QUERY}{self.run}"
        if self.pictures == rules.segments:
            return EOS
        if 0 < self.pictures <= len(rules.script):
            caption = rules.script[self.pictures - 1]
            return BOI if self.run == len(caption) else f"{SCRIPTED}{caption[self.run]}"
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
    if choice.startswith(QUERY):
        return token == layout.query_base + int(choice.removeprefix(QUERY))
    if choice.startswith(SCRIPTED):
        return token == int(choice.removeprefix(SCRIPTED))
    lo, hi = layout.text_range
    text = lo <= token < hi
    return {
        CAPTION_FIRST: text,
        CAPTION: text or token == layout.boi,
        BOI: token == layout.boi,
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
    if layout.boi in caption or any(layout.is_query(tok) for tok in caption):
        raise ValueError("the prompt ends inside a picture; end it with whole segments or a caption")
    return GrammarState(rules, layout, run=rules.max_caption_tokens if caption else 0)
