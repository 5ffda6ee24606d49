import dataclasses
import json

import pytest
import torch

from actors.config import FULL, TINY, Preset, get_preset
from actors.detokenizer.model import FeatureAdapter, build_unet, build_vae
from actors.mllm.heads import PictureHeads
from actors.mllm.model import build_mllm, parameter_count
from actors.tokenizer.model import VisualTokenizer
from actors.tokenizer.text import SPECIALS, TokenLayout


def n_params(module) -> int:
    return sum(p.numel() for p in module.parameters())


def layout(vocab: int, q: int) -> TokenLayout:
    return TokenLayout(
        pad=0, bos=1, eos=2, unk=3, boi=4, eoi=5, query_base=6, num_queries=q, vocab_size=vocab
    )


def test_llama2_7b_shape_has_its_known_parameter_count():
    # Llama-2-7B's published count, with its 32000-token vocabulary.
    assert parameter_count(FULL.mllm, 32000) == 6_738_415_616


def test_full_mllm_count_from_config_matches_the_model_built_on_meta():
    vocab = len(SPECIALS) + FULL.num_queries + FULL.text_vocab_size
    with torch.device("meta"):
        model = build_mllm(FULL.mllm, layout(vocab, FULL.num_queries))
    assert n_params(model) == parameter_count(FULL.mllm, vocab)
    assert n_params(model) == 6_738_415_616 + (vocab - 32000) * 4096 * 2


def test_full_detokenizer_is_sdxl_sized():
    with torch.device("meta"):
        unet, vae = build_unet(FULL.detokenizer), build_vae(FULL.detokenizer)
        adapter = FeatureAdapter(FULL.detokenizer)
    # SDXL base 1.0: UNet 2,567,463,684 and VAE 83,653,863 parameters.
    assert n_params(unet) == 2_567_463_684
    assert n_params(vae) == 83_653_863
    assert FULL.detokenizer.latent_size == 128 and FULL.num_queries == 64
    assert (
        adapter.null_prompt.shape == (1, 64, 2048) and adapter.proj_in.in_features == FULL.feature_dim == 256
    )


def test_tiny_models_are_cpu_sized():
    vocab = len(SPECIALS) + TINY.num_queries + TINY.text_vocab_size
    assert parameter_count(TINY.mllm, vocab) < 5_000_000
    assert n_params(VisualTokenizer(TINY.visual)) < 2_000_000
    assert n_params(build_unet(TINY.detokenizer)) < 5_000_000
    assert n_params(PictureHeads(TINY.heads)) < 2_000_000


def test_preset_round_trips_through_a_dict():
    for preset in (TINY, FULL):
        data = preset.to_dict()
        assert Preset.from_dict(data) == preset
        assert data["heads"]["feature_dim"] == data["visual"]["feature_dim"] == preset.feature_dim
        assert data["heads"]["hidden_size"] == preset.mllm.hidden_size
        assert "codebook_size" not in str(data) and "code_dim" not in str(data)
    assert (TINY.num_queries, TINY.feature_dim) == (16, 64)
    assert (FULL.num_queries, FULL.feature_dim) == (64, 256)


def test_manifest_round_trips_with_heads_and_feature_dim(tmp_path):
    from actors.checkpoint import FORMAT_VERSION, PARTS, Manifest, read_manifest, write_manifest

    manifest = Manifest(preset=TINY, tokens=layout(300, TINY.num_queries), dtype="float16")
    write_manifest(tmp_path, manifest)
    data = json.loads((tmp_path / "manifest.json").read_text())
    assert data["format_version"] == FORMAT_VERSION == 2
    assert data["feature_dim"] == 64 and data["num_queries"] == 16 and "codebook_size" not in data
    assert data["preset"]["heads"] == dataclasses.asdict(TINY.heads)
    assert read_manifest(tmp_path) == manifest and "heads" in PARTS


def test_a_format_1_checkpoint_is_refused_with_a_word_to_retrain(tmp_path):
    """A checkpoint of discrete visual codes cannot be read as features: the message says so."""
    from actors.checkpoint import Manifest, read_manifest, write_manifest

    write_manifest(tmp_path, Manifest(preset=TINY, tokens=layout(300, TINY.num_queries), dtype="float16"))
    data = json.loads((tmp_path / "manifest.json").read_text())
    (tmp_path / "manifest.json").write_text(json.dumps({**data, "format_version": 1}))
    with pytest.raises(ValueError, match="checkpoint format 1 is not 2.*retrain"):
        read_manifest(tmp_path)


def test_inconsistent_presets_are_rejected():
    with pytest.raises(ValueError, match="disagree on Q"):
        dataclasses.replace(TINY, visual=dataclasses.replace(TINY.visual, num_queries=8))
    with pytest.raises(ValueError, match="disagree on Q or D"):
        dataclasses.replace(TINY, heads=dataclasses.replace(TINY.heads, feature_dim=32))
    with pytest.raises(ValueError, match="hidden_size"):
        dataclasses.replace(TINY, heads=dataclasses.replace(TINY.heads, hidden_size=128))
    with pytest.raises(ValueError, match="divide by num_heads"):
        dataclasses.replace(TINY.mllm, num_heads=3)
    with pytest.raises(ValueError, match="unknown preset"):
        get_preset("huge")
