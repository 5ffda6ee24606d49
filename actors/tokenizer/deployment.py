"""TokenizerPool: the Serve deployment that turns a story request into the MLLM's prompt ids.

Captions become text ids and a start image becomes Q visual codes; both are batched across
concurrent requests with ``@serve.batch``. Input problems come back as data,
``{"error": {"field": ..., "message": ...}}``, so that the ingress can answer INVALID_ARGUMENT.
"""

from __future__ import annotations

import asyncio

import torch
from ray import serve

from actors.errors import InputError
from actors.tokenizer.prompts import PromptBuilder
from actors.tokenizer.text import caption_text


# Replicas, resources, autoscaling and max_ongoing_requests: ray_config.yaml.
@serve.deployment(name="TokenizerPool")
class TokenizerPool:
    def __init__(self, checkpoint: str, threads: int = 1):
        torch.set_num_threads(threads)
        self.builder = PromptBuilder(checkpoint)

    async def prompt(
        self, caption: str, caption_ids: list[int], start_image: bytes | None, story_so_far: list[dict]
    ) -> dict:
        """[<s>] + earlier segments + the opening caption (+ its picture, if given) as ids.

        A caption comes as text or as exact ids (``caption_ids``, from an earlier CaptionEvent); an
        empty opening (continuing a story) leaves the next caption to the MLLM. Returns
        ``{"prompt_ids", "caption_ids", "caption"}``, the last two for the opening caption."""
        try:
            captions = await asyncio.gather(
                *(
                    self._caption(s["caption"], s["caption_ids"], f"story_so_far[{i}]")
                    for i, s in enumerate(story_so_far)
                ),
                self._caption(caption, caption_ids, ""),
            )
            codes = await self.encode_image(start_image) if start_image else None
            if isinstance(codes, InputError):
                raise codes
        except InputError as e:
            return {"error": {"field": e.field, "message": e.message}}
        earlier = [(ids, s["visual_codes"]) for ids, s in zip(captions, story_so_far)]
        opening = captions[-1]
        return {
            "prompt_ids": self.builder.prompt(opening, codes, earlier),
            "caption_ids": opening,
            "caption": caption or caption_text(self.builder.text, opening),
        }  # the client's text if given

    async def _caption(self, text: str, ids: list[int], prefix: str) -> list[int]:
        """One caption's ids: exact ids if given, else the text's; an empty opening stays empty."""
        field = f"{prefix}.caption" if prefix else "caption"
        if ids:
            return self.builder.check_caption(ids, f"{field}_ids")
        if not text and not prefix:
            return []  # continuing a story: the MLLM writes the next caption (checked at the ingress)
        return self.builder.check_caption(await self.encode_caption(text), field)

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.005)
    async def encode_caption(self, captions: list[str]) -> list[list[int]]:
        return self.builder.caption_ids(captions)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.005)
    async def encode_image(self, images: list[bytes]) -> list[list[int] | InputError]:
        # A bad picture is returned (not raised): raising would fail every request in the batch.
        return self.builder.image_codes(images)
