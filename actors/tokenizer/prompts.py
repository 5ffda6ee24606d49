"""Captions and pictures -> the MLLM's prompt ids: the plain core of the TokenizerPool (online,
batched by Serve) and of the bulk job's tokenizer stage (batched by Ray Data)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from actors.checkpoint import part_dir, read_manifest
from actors.errors import InputError
from actors.imageio import ImageError, decode_image, resize_square, to_tensor
from actors.tokenizer.model import VisualTokenizer
from actors.tokenizer.text import load_text_tokenizer


@dataclass
class Prompt:
    """The MLLM's prompt: ids, and the given pictures by the position of their first query row (the
    MLLMPool puts the input head's rows of their features there)."""

    ids: list[int]
    given: dict[int, np.ndarray] = field(default_factory=dict)  # position -> features (Q, D) float32


class PromptBuilder:
    def __init__(self, checkpoint: str):
        self.manifest = read_manifest(checkpoint)
        self.text = load_text_tokenizer(part_dir(checkpoint, "tokenizer"))
        self.visual = VisualTokenizer.from_pretrained(part_dir(checkpoint, "visual_tokenizer")).eval()

    def caption_ids(self, captions: list[str]) -> list[list[int]]:
        return self.text(captions, add_special_tokens=False)["input_ids"]

    def check_caption(self, ids: list[int], field: str) -> list[int]:
        """Ids of one caption, made here from text or sent by a client as exact ids."""
        limit = self.manifest.preset.max_caption_tokens
        lo, hi = self.manifest.tokens.text_range
        if not ids:
            raise InputError(field, "no tokens")
        if len(ids) > limit:
            raise InputError(field, f"{len(ids)} tokens, more than this model's {limit}")
        bad = [i for i in ids if not lo <= i < hi]
        if bad:
            raise InputError(field, f"{bad[0]} is not a caption token id (those are [{lo}, {hi}))")
        return list(ids)

    def image_features(self, images: list[bytes]) -> list[np.ndarray | InputError]:
        """Features (Q, D) float32 per picture; a bad picture gives its InputError in place (the
        others still encode)."""
        size, pixels, out = self.manifest.preset.image_size, [], []
        for data in images:
            try:
                pixels.append(resize_square(decode_image(data), size))
                out.append(None)
            except ImageError as e:
                out.append(InputError("start_image", str(e)))
        if pixels:
            features = iter(self.visual.encode(to_tensor(pixels)).numpy())  # (B, Q, D)
            out = [next(features) if o is None else o for o in out]
        return out

    def prompt(
        self,
        caption_ids: list[int],
        start: np.ndarray | None,
        story_so_far: list[tuple[list[int], np.ndarray | None]] = (),
    ) -> Prompt:
        """[<s>] + earlier segments + the opening caption (+ its picture, if a start picture is
        given). An earlier segment's picture is None when the service wrote it (its ids alone
        recompute it), else the features of a picture given as an image."""
        layout = self.manifest.tokens
        ids, given = [layout.bos], {}
        segments = [*story_so_far, (caption_ids, start)]
        for k, (caption, features) in enumerate(segments):
            ids += caption
            last = k == len(segments) - 1
            if last and features is None:  # the opening caption's picture is the MLLM's to write
                break
            if features is not None:
                given[len(ids) + 1] = features  # its first query row, after <img>
            ids += layout.picture_ids
        return Prompt(ids, given)
