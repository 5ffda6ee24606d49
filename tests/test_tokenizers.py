import numpy as np
import pytest
import torch

from actors.checkpoint import part_dir, read_manifest
from actors.config import TINY
from actors.imageio import to_tensor
from actors.tokenizer.model import VisualTokenizer
from actors.tokenizer.text import (
    encode_segment,
    load_text_tokenizer,
    query_token,
    segment_ids,
    split_segments,
    token_layout,
    written_captions,
)


@pytest.fixture(scope="module")
def text(tiny_ckpt):
    return load_text_tokenizer(part_dir(tiny_ckpt, "tokenizer")), read_manifest(tiny_ckpt).tokens


def test_layout_matches_the_trained_vocabulary(text):
    tok, t = text
    assert tok.convert_ids_to_tokens([t.boi, t.eoi, t.bos, t.eos, t.pad]) == [
        "<img>",
        "</img>",
        "<s>",
        "</s>",
        "<pad>",
    ]
    # The Q query tokens, SEED-Story's <img_00000> .., are contiguous ids after the specials.
    assert t.num_queries == TINY.num_queries == 16
    assert t.query_ids == list(range(t.query_base, t.query_base + 16))
    assert tok.convert_ids_to_tokens(t.query_ids) == [f"<img_{i:05d}>" for i in range(16)]
    assert query_token(0) == "<img_00000>" and query_token(15) == "<img_00015>"
    assert t.picture_ids == [t.boi, *t.query_ids, t.eoi]
    assert t.vocab_size == len(tok) and t.text_range == (t.query_base + 16, len(tok))


def test_is_query_holds_exactly_the_query_ids(text):
    _, t = text
    assert all(t.is_query(i) for i in t.query_ids)
    assert not any(t.is_query(i) for i in (t.query_base - 1, t.query_base + t.num_queries, t.boi, t.eoi))


def test_a_layout_asked_for_more_queries_than_the_vocabulary_holds_is_refused(text):
    tok, t = text
    with pytest.raises(ValueError, match="not contiguous"):
        token_layout(tok, t.num_queries + 1)


def test_mixed_text_and_pictures_round_trip(text):
    tok, t = text
    story = [
        ("Once upon a time, Milo the red circle walks in the park.", True),
        ("Then Milo the red circle and Bea jump in the snowfield.", True),
        ("Suddenly Bea runs in the city.", False),  # its picture not written yet
    ]
    ids = [t.bos] + sum((encode_segment(tok, t, c, picture) for c, picture in story), []) + [t.eos]
    # Every picture is the same ids: <img>, the Q query ids, </img>.
    assert ids.count(t.boi) == 2 and sum(t.is_query(i) for i in ids) == 2 * t.num_queries
    first = ids.index(t.boi)
    assert ids[first : first + t.num_queries + 2] == t.picture_ids
    parsed = split_segments(t, ids)
    assert [has_picture for _, has_picture in parsed] == [True, True, False]
    assert [tok.decode(cap).strip() for cap, _ in parsed] == [c for c, _ in story]
    # ... and back: the segments' ids are the story's, without <s> and </s>.
    assert sum((segment_ids(t, cap, has) for cap, has in parsed), []) == ids[1:-1]
    assert written_captions(t, ids) == [cap for cap, _ in parsed[:2]]
    # Decoding the whole sequence keeps the specials in place.
    assert "<img>" + "".join(query_token(i) for i in range(16)) + "</img>" in tok.decode(ids).replace(" ", "")


def test_a_segment_without_its_picture_is_its_caption_alone(text):
    _, t = text
    lo = t.text_range[0]
    assert segment_ids(t, [lo, lo + 1], picture=False) == [lo, lo + 1]
    assert segment_ids(t, [lo], picture=True) == [lo, *t.picture_ids]
    assert split_segments(t, [t.bos, lo, *t.picture_ids, lo + 1, *t.picture_ids]) == [
        ([lo], True),
        ([lo + 1], True),
    ]


def test_captions_do_not_produce_query_or_unknown_tokens(text):
    tok, t = text
    ids = tok.encode(
        "Suddenly Zara the yellow diamond takes a rest in the night garden.", add_special_tokens=False
    )
    assert not any(t.is_query(i) or i in (t.unk, t.boi, t.eoi) for i in ids)


def test_visual_tokenizer_encodes_unit_features_and_decodes_them(storyworld):
    from PIL import Image

    torch.manual_seed(0)
    vt = VisualTokenizer(TINY.visual).eval()
    files = sorted((storyworld / "images" / "000000").glob("*.jpg"))[:3]
    images = to_tensor([Image.open(f).convert("RGB") for f in files])
    features = vt.encode(images)
    assert features.shape == (3, TINY.num_queries, TINY.feature_dim) and features.dtype == torch.float32
    torch.testing.assert_close(features.norm(dim=-1), torch.ones(3, TINY.num_queries))  # unit rows
    assert not features.requires_grad  # encode is for serving: no graph
    torch.testing.assert_close(vt.encode(images[1:2]), features[1:2], atol=1e-5, rtol=1e-5)  # batch-free
    assert not torch.equal(features[0], features[1])  # different pictures, different features
    assert vt.decode(features).shape == images.shape
    assert vt.mean_patch(images).shape == (3, TINY.visual.width)
    assert not any(hasattr(vt, name) for name in ("codebook", "quantize", "embed"))  # no codes left


def test_visual_tokenizer_trains_through_its_features():
    torch.manual_seed(0)
    vt = VisualTokenizer(TINY.visual)
    images = torch.rand(2, 3, 64, 64) * 2 - 1
    torch.nn.functional.mse_loss(vt.decode(vt.latents(images)), images).backward()
    assert vt.patch_embed.weight.grad is not None and vt.patch_embed.weight.grad.abs().sum() > 0


def test_features_cross_the_wire_as_little_endian_float32():
    from actors.features import from_bytes, to_bytes

    rows = np.random.default_rng(0).standard_normal((16, 64)).astype(np.float32)
    data = to_bytes(rows)
    assert len(data) == 16 * 64 * 4 and data[:4] == rows[0, 0].astype("<f4").tobytes()
    np.testing.assert_array_equal(from_bytes(data, 16, 64), rows)
    with pytest.raises(ValueError, match="bytes"):
        from_bytes(data[:-4], 16, 64)
    with pytest.raises(ValueError, match="not finite"):
        from_bytes(to_bytes(np.full((16, 64), np.nan, dtype=np.float32)), 16, 64)
