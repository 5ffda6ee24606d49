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
from actors.mllm.heads import PictureHeads
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
    assert (manifest.num_queries, manifest.feature_dim, manifest.image_size) == (16, 64, 64)
    assert manifest.to_dict()["feature_dim"] == 64 and "codebook_size" not in manifest.to_dict()
    size = sum(f.stat().st_size for f in tiny_ckpt.rglob("*") if f.is_file())
    assert size < 50e6


def test_mllm_forward_and_its_heads(tiny_ckpt, manifest):
    """The Llama reads a picture's query ids; the output head maps the final-norm rows there to Q
    unit features, and the input head maps features back to Q embedding rows."""
    model = load_mllm(part_dir(tiny_ckpt, "mllm"))
    heads = PictureHeads.from_pretrained(part_dir(tiny_ckpt, "heads")).eval()
    t = manifest.tokens
    lo = t.text_range[0]
    ids = torch.tensor([[t.bos, lo, lo + 1, *t.picture_ids]])
    out = model(ids, output_hidden_states=True)
    assert out.logits.shape == (1, ids.shape[1], t.vocab_size)
    assert torch.isfinite(out.logits).all()
    rows = out.hidden_states[-1][:, 4 : 4 + t.num_queries]  # final-norm rows at the query positions
    with torch.no_grad():
        features = heads.features(rows)
        embeds = heads.embeddings(features)
    assert features.shape == (1, 16, manifest.feature_dim)
    torch.testing.assert_close(features.norm(dim=-1), torch.ones(1, 16))
    assert embeds.shape == (1, 16, TINY.mllm.hidden_size) and torch.isfinite(embeds).all()
    assert heads.config == TINY.heads


def test_detokenizer_renders_a_64px_png_through_the_sdxl_pipeline(tiny_ckpt):
    from diffusers import StableDiffusionXLPipeline

    detok = Detokenizer.from_pretrained(part_dir(tiny_ckpt, "detokenizer"))
    assert isinstance(detok.pipeline, StableDiffusionXLPipeline) and detok.pipeline.text_encoder is None
    features = torch.nn.functional.normalize(
        torch.randn(2, 16, TINY.feature_dim, generator=torch.Generator().manual_seed(0)), dim=-1
    )
    for guidance in (1.0, 3.0):  # 3.0 runs classifier-free guidance against the learned null condition
        images = detok.render(
            features, steps=4, guidance=guidance, generator=torch.Generator().manual_seed(0)
        )
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


def test_visual_tokenizer_save_load_gives_identical_features(tmp_path):
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
    features = torch.randn(1, 16, TINY.feature_dim, generator=torch.Generator().manual_seed(1))

    def render(d):
        return np.asarray(d.render(features, steps=3, generator=torch.Generator().manual_seed(0))[0])

    assert np.array_equal(render(detok), render(loaded))
    # render_seeded takes (Q, D) arrays, one a picture, and draws each from its own seed (the same
    # up to the rounding of a batch's kernels: exact equality is the render slots' self-test's).
    rows = [features[0].numpy(), -features[0].numpy()]
    both = detok.render_seeded(rows, [5, 6], steps=2)
    alone = detok.render_seeded(rows[1:], [6], steps=2)
    assert len(both) == 2 and both[0].size == (64, 64)
    assert np.abs(np.asarray(both[1], dtype=int) - np.asarray(alone[0], dtype=int)).max() <= 2
    assert loaded.scheduler.config.prediction_type == "v_prediction"
    assert loaded.scheduler.config.rescale_betas_zero_snr is True


def test_picture_heads_save_load_gives_identical_features(tmp_path):
    torch.manual_seed(4)
    heads = fp16_exact(PictureHeads(TINY.heads).eval())
    heads.save_pretrained(tmp_path / "heads", "float16")
    loaded = PictureHeads.from_pretrained(tmp_path / "heads").eval()
    rows = torch.randn(2, 16, TINY.mllm.hidden_size)
    with torch.no_grad():
        assert torch.equal(heads.features(rows), loaded.features(rows))
        features = heads.features(rows)
        assert torch.equal(heads.embeddings(features), loaded.embeddings(features))
    assert loaded.config == TINY.heads
