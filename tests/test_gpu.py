"""The GPU path: tests marked ``gpu`` run where torch sees a CUDA device and are skipped elsewhere
(tests/conftest.py). CI has no GPU; these run on a lent GPU machine: ``bash scripts/test.sh -m gpu``."""

from __future__ import annotations

import pytest

from actors.checkpoint import part_dir
from actors.imageio import to_png

pytestmark = pytest.mark.gpu


def test_a_render_on_the_gpu_depends_only_on_its_features_and_seed(tiny_ckpt):
    """A render sent again after a lost replica must give the same PNG, on a GPU too."""
    import numpy as np
    import torch

    from actors.detokenizer.model import Detokenizer

    detokenizer = Detokenizer.from_pretrained(part_dir(tiny_ckpt, "detokenizer"))
    detokenizer.pipeline.to("cuda")
    detokenizer.adapter.to("cuda")
    assert detokenizer.unet.device.type == "cuda"
    shape = (detokenizer.config.num_queries, detokenizer.config.feature_dim)
    draw = np.random.default_rng(0)
    features, seeds = [draw.standard_normal(shape, dtype=np.float32) for _ in range(2)], [5, 6]
    first = [to_png(img) for img in detokenizer.render_seeded(features, seeds, steps=4, guidance=2.0)]
    again = [to_png(img) for img in detokenizer.render_seeded(features, seeds, steps=4, guidance=2.0)]
    assert first == again
    assert first[0] != first[1]
    torch.cuda.empty_cache()
