import copy
import io

import numpy as np
import pytest
import torch
from PIL import Image

from actors.checkpoint import part_dir, read_manifest
from actors.config import TINY
from actors.detokenizer.model import Detokenizer
from actors.imageio import to_png
from actors.mllm.model import build_mllm, load_mllm
from actors.tokenizer.model import VisualTokenizer


def fp16_exact(module):
    """Round weights to float16 values (kept in float32), so a float16 save loses nothing."""
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(p.half().float())
    return module


@pytest.fixture(scope="module")
def manifest(tiny_ckpt):
    return read_manifest(tiny_ckpt)


def test_manifest_records_the_preset_and_token_ids(tiny_ckpt, manifest):
    assert manifest.preset == TINY and manifest.dtype == "float16"
    assert (manifest.num_queries, manifest.codebook_size, manifest.image_size) == (16, 256, 64)
    size = sum(f.stat().st_size for f in tiny_ckpt.rglob("*") if f.is_file())
    assert size < 50e6


def test_mllm_forward(tiny_ckpt, manifest):
    model = load_mllm(part_dir(tiny_ckpt, "mllm"))
    t = manifest.tokens
    ids = torch.tensor([[t.bos, 100, 101, t.boi] + [t.visual_id(c) for c in range(16)] + [t.eoi]])
    logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], t.vocab_size)
    assert torch.isfinite(logits).all()


def test_detokenizer_renders_a_64px_png_through_the_sdxl_pipeline(tiny_ckpt):
    from diffusers import StableDiffusionXLPipeline

    detok = Detokenizer.from_pretrained(part_dir(tiny_ckpt, "detokenizer"))
    assert isinstance(detok.pipeline, StableDiffusionXLPipeline) and detok.pipeline.text_encoder is None
    codes = torch.tensor([list(range(16)), list(range(16, 32))])
    for guidance in (1.0, 3.0):  # 3.0 runs classifier-free guidance against the learned null condition
        images = detok.render(codes, steps=4, guidance=guidance, generator=torch.Generator().manual_seed(0))
        assert len(images) == 2
        png = to_png(images[0])
        assert png[:8] == b"\x89PNG\r\n\x1a\n"
        assert Image.open(io.BytesIO(png)).size == (64, 64)


def test_mllm_save_load_gives_identical_logits(tmp_path, manifest):
    torch.manual_seed(1)
    model = fp16_exact(build_mllm(TINY.mllm, manifest.tokens))
    copy.deepcopy(model).half().save_pretrained(tmp_path / "mllm")
    ids = torch.randint(0, manifest.tokens.vocab_size, (2, 30))
    assert torch.equal(model(ids).logits, load_mllm(tmp_path / "mllm")(ids).logits)


def test_visual_tokenizer_save_load_gives_identical_codes(tmp_path):
    torch.manual_seed(2)
    vt = fp16_exact(VisualTokenizer(TINY.visual).eval())
    vt.save_pretrained(tmp_path / "vt", dtype="float16")
    loaded = VisualTokenizer.from_pretrained(tmp_path / "vt")
    images = torch.rand(4, 3, 64, 64) * 2 - 1
    assert torch.equal(vt.encode(images), loaded.encode(images))
    assert torch.equal(vt.latents(images), loaded.latents(images))
    assert loaded.config == TINY.visual


def test_detokenizer_save_load_gives_identical_pictures(tmp_path):
    torch.manual_seed(3)
    detok = Detokenizer.build(TINY.detokenizer)
    for m in (detok.unet, detok.vae, detok.adapter):
        fp16_exact(m)
    detok.save_pretrained(tmp_path / "detok", dtype="float16")
    loaded = Detokenizer.from_pretrained(tmp_path / "detok")
    codes = torch.randint(0, 256, (1, 16))

    def render(d):
        return np.asarray(d.render(codes, steps=3, generator=torch.Generator().manual_seed(0))[0])

    assert np.array_equal(render(detok), render(loaded))
    assert loaded.scheduler.config.prediction_type == "v_prediction"
    assert loaded.scheduler.config.rescale_betas_zero_snr is True
