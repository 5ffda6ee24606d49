"""TokenizerPool: the Serve deployment that turns a story request into the MLLM's prompt.

Captions become text ids, and pictures given as images (a start image, a picture in the story so
far that the service did not write) become features, Q rows of D floats, by the visual tokenizer;
both are batched across concurrent requests with ``@serve.batch``. Input problems come back as
data, ``{"error": {"field": ..., "message": ...}}``, so that the ingress can answer INVALID_ARGUMENT.
"""

from __future__ import annotations

import asyncio

import numpy as np
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
        """[<s>] + earlier segments + the opening caption (+ its picture, if given) as ids, and the
        features of the given pictures.

        A caption comes as text or as exact ids (``caption_ids``, from an earlier CaptionEvent); an
        empty opening (continuing a story) leaves the next caption to the MLLM. An earlier segment's
        picture is the service's own (``"image": None``: its ids recompute it) or given as image
        bytes. Returns ``{"prompt_ids", "given", "caption_ids", "caption"}``: ``given`` maps the
        position of each given picture's first query row to its features (Q, D) float32; the last
        two are the opening caption's."""
        n = len(story_so_far) + 1
        done = await asyncio.gather(
            *(
                self._caption(s["caption"], s["caption_ids"], f"story_so_far[{i}]")
                for i, s in enumerate(story_so_far)
            ),
            self._caption(caption, caption_ids, ""),
            *(self._picture(s["image"], f"story_so_far[{i}].image") for i, s in enumerate(story_so_far)),
            self._picture(start_image, "start_image"),
            return_exceptions=True,
        )
        errors = [e for e in done if isinstance(e, BaseException)]
        if errors:  # the first bad field in the request's order: captions, then pictures
            if isinstance(errors[0], InputError):
                return {"error": {"field": errors[0].field, "message": errors[0].message}}
            raise errors[0]
        captions, pictures = done[:n], done[n:]
        opening = captions[-1]
        prompt = self.builder.prompt(opening, pictures[-1], list(zip(captions[:-1], pictures[:-1])))
        return {
            "prompt_ids": prompt.ids,
            "given": prompt.given,
            "caption_ids": opening,
            "caption": caption or caption_text(self.builder.text, opening),  # the client's text if given
        }

    async def _caption(self, text: str, ids: list[int], prefix: str) -> list[int]:
        """One caption's ids: exact ids if given, else the text's; an empty opening stays empty."""
        field = f"{prefix}.caption" if prefix else "caption"
        if ids:
            return self.builder.check_caption(ids, f"{field}_ids")
        if not text and not prefix:
            return []  # continuing a story: the MLLM writes the next caption (checked at the ingress)
        return self.builder.check_caption(await self.encode_caption(text), field)

    async def _picture(self, image: bytes | None, field: str) -> np.ndarray | None:
        """A given picture's features; None for none (the MLLM writes or has written it)."""
        if not image:
            return None
        features = await self.encode_image(image)
        if isinstance(features, InputError):
            raise InputError(field, features.message)  # named for where the picture was given
        return features

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.005)
    async def encode_caption(self, captions: list[str]) -> list[list[int]]:
        return self.builder.caption_ids(captions)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.005)
    async def encode_image(self, images: list[bytes]) -> list[np.ndarray | InputError]:
        # A bad picture is returned (not raised): raising would fail every request in the batch.
        return self.builder.image_features(images)
