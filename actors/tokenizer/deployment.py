"""TokenizerPool: the Serve deployment that turns a story request into the MLLM's prompt ids.

Captions become text ids and a start image becomes Q visual codes; both are batched across
concurrent requests with ``@serve.batch``. Input problems come back as data,
``{"error": {"field": ..., "message": ...}}``, so that the ingress can answer INVALID_ARGUMENT.
"""

from __future__ import annotations

import asyncio

import torch
from ray import serve

from actors.checkpoint import part_dir, read_manifest
from actors.imageio import ImageError, decode_image, resize_square, to_tensor
from actors.tokenizer.model import VisualTokenizer
from actors.tokenizer.text import load_text_tokenizer, segment_ids


class InputError(ValueError):
    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field, self.message = field, message


# Replicas, resources, autoscaling and max_ongoing_requests: ray_config.yaml.
@serve.deployment(name="TokenizerPool")
class TokenizerPool:
    def __init__(self, checkpoint: str, threads: int = 1):
        torch.set_num_threads(threads)
        self.manifest = read_manifest(checkpoint)
        self.text = load_text_tokenizer(part_dir(checkpoint, "tokenizer"))
        self.visual = VisualTokenizer.from_pretrained(part_dir(checkpoint, "visual_tokenizer")).eval()

    async def prompt(self, caption: str, start_image: bytes | None, story_so_far: list[dict]) -> dict:
        """[<s>] + earlier segments + the opening caption (+ its picture, if given) as ids."""
        t = self.manifest.tokens
        try:
            captions = await asyncio.gather(*(self._caption(s["caption"], f"story_so_far[{i}].caption")
                                              for i, s in enumerate(story_so_far)),
                                            self._caption(caption, "caption"))
            codes = await self.encode_image(start_image) if start_image else None
            if isinstance(codes, InputError):
                raise codes
        except InputError as e:
            return {"error": {"field": e.field, "message": e.message}}
        ids = [t.bos]
        for seg, caption_ids in zip(story_so_far, captions):
            ids += segment_ids(t, caption_ids, seg["visual_codes"])
        ids += segment_ids(t, captions[-1], codes)
        return {"prompt_ids": ids, "start_codes": codes}

    async def _caption(self, caption: str, field: str) -> list[int]:
        ids = await self.encode_caption(caption)
        limit = self.manifest.preset.max_caption_tokens
        if len(ids) > limit:
            raise InputError(field, f"{len(ids)} tokens, more than this model's {limit}")
        if not ids:
            raise InputError(field, "no tokens")
        return ids

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.005)
    async def encode_caption(self, captions: list[str]) -> list[list[int]]:
        return self.text(captions, add_special_tokens=False)["input_ids"]

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.005)
    async def encode_image(self, images: list[bytes]) -> list[list[int] | InputError]:
        # A bad picture is returned (not raised): raising would fail every request in the batch.
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
