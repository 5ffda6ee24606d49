"""Captions and pictures -> the MLLM's prompt ids: the plain core of the TokenizerPool (online,
batched by Serve) and of the bulk job's tokenizer stage (batched by Ray Data)."""

from __future__ import annotations

import torch

from actors.checkpoint import part_dir, read_manifest
from actors.errors import InputError
from actors.imageio import ImageError, decode_image, resize_square, to_tensor
from actors.tokenizer.model import VisualTokenizer
from actors.tokenizer.text import load_text_tokenizer, segment_ids


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

    def image_codes(self, images: list[bytes]) -> list[list[int] | InputError]:
        """Q codes per picture; a bad picture gives its InputError in place (the others still encode)."""
        size, pixels, out = self.manifest.preset.image_size, [], []
        for data in images:
            try:
                pixels.append(resize_square(decode_image(data), size))
                out.append(None)
            except ImageError as e:
                out.append(InputError("start_image", str(e)))
        if pixels:
            with torch.no_grad():
                codes = iter(self.visual.encode(to_tensor(pixels)).tolist())  # (B, Q)
            out = [next(codes) if o is None else o for o in out]
        return out

    def prompt(
        self,
        caption_ids: list[int],
        codes: list[int] | None,
        story_so_far: list[tuple[list[int], list[int]]] = (),
    ) -> list[int]:
        """[<s>] + earlier segments + the opening caption (+ its picture, if given)."""
        layout = self.manifest.tokens
        ids = [layout.bos]
        for earlier_caption, earlier_codes in story_so_far:
            ids += segment_ids(layout, earlier_caption, earlier_codes)
        return ids + segment_ids(layout, caption_ids, codes)
