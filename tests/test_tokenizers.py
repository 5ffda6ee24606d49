import pytest
import torch

from actors.checkpoint import part_dir, read_manifest
from actors.config import TINY
from actors.imageio import to_tensor
from actors.tokenizer.model import VisualTokenizer
from actors.tokenizer.text import encode_segment, load_text_tokenizer, split_segments


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
    assert tok.convert_ids_to_tokens(t.visual_id(0)) == "<v00000>"
    assert tok.convert_ids_to_tokens(t.visual_id(255)) == "<v00255>"
    assert t.vocab_size == len(tok) and t.num_codes == TINY.codebook_size


def test_visual_code_maps_to_and_from_its_token_id(text):
    _, t = text
    for code in (0, 1, 128, 255):
        assert t.visual_code(t.visual_id(code)) == code
    with pytest.raises(ValueError):
        t.visual_id(256)
    with pytest.raises(ValueError):
        t.visual_code(t.boi)


def test_mixed_text_and_visual_tokens_round_trip(text):
    tok, t = text
    story = [
        ("Once upon a time, Milo the red circle walks in the park.", [3, 0, 255, 17]),
        ("Then Milo the red circle and Bea jump in the snowfield.", [9, 9, 1, 200]),
    ]
    ids = [t.bos] + sum((encode_segment(tok, t, c, codes) for c, codes in story), []) + [t.eos]
    # The visual tokens sit between <img> and </img>, as their own ids.
    assert ids.count(t.boi) == 2 and sum(t.is_visual(i) for i in ids) == 8
    parsed = split_segments(t, ids)
    assert [codes for _, codes in parsed] == [codes for _, codes in story]
    assert [tok.decode(cap).strip() for cap, _ in parsed] == [c for c, _ in story]
    # Decoding the whole sequence keeps the specials in place.
    assert "<img><v00003><v00000><v00255><v00017></img>" in tok.decode(ids).replace(" ", "")


def test_captions_do_not_produce_visual_or_unknown_tokens(text):
    tok, t = text
    ids = tok.encode(
        "Suddenly Zara the yellow diamond takes a rest in the night garden.", add_special_tokens=False
    )
    assert not any(t.is_visual(i) or i in (t.unk, t.boi, t.eoi) for i in ids)


def test_visual_tokenizer_encode_embed_decode(storyworld):
    from PIL import Image

    torch.manual_seed(0)
    vt = VisualTokenizer(TINY.visual).eval()
    files = sorted((storyworld / "images" / "000000").glob("*.jpg"))[:3]
    images = to_tensor([Image.open(f).convert("RGB") for f in files])
    codes = vt.encode(images)
    assert codes.shape == (3, 16) and codes.dtype == torch.long
    assert 0 <= int(codes.min()) and int(codes.max()) < TINY.codebook_size
    emb = vt.embed(codes)
    assert emb.shape == (3, 16, 64)
    # The quantised latents are exactly the codebook vectors of the chosen codes.
    _, zq = vt.quantize(vt.latents(images))
    assert torch.allclose(zq, emb, atol=1e-6)
    assert vt.decode(zq).shape == images.shape


def test_visual_tokenizer_trains_through_the_straight_through_quantiser():
    torch.manual_seed(0)
    vt = VisualTokenizer(TINY.visual)
    images = torch.rand(2, 3, 64, 64) * 2 - 1
    _, zq = vt.quantize(vt.latents(images))
    torch.nn.functional.mse_loss(vt.decode(zq), images).backward()
    assert vt.patch_embed.weight.grad is not None and vt.patch_embed.weight.grad.abs().sum() > 0
