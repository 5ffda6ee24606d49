import dataclasses

import pytest
import torch

from actors.config import FULL, TINY, Preset, get_preset
from actors.detokenizer.model import CodeAdapter, build_unet, build_vae
from actors.mllm.model import build_mllm, parameter_count
from actors.tokenizer.model import VisualTokenizer
from actors.tokenizer.text import TokenLayout


def n_params(module) -> int:
    return sum(p.numel() for p in module.parameters())


def layout(vocab: int, k: int) -> TokenLayout:
    return TokenLayout(pad=0, bos=1, eos=2, unk=3, boi=4, eoi=5, visual_base=6, num_codes=k, vocab_size=vocab)


def test_llama2_7b_shape_has_its_known_parameter_count():
    # Llama-2-7B's published count, with its 32000-token vocabulary.
    assert parameter_count(FULL.mllm, 32000) == 6_738_415_616


def test_full_mllm_count_from_config_matches_the_model_built_on_meta():
    vocab = 6 + FULL.codebook_size + FULL.text_vocab_size
    with torch.device("meta"):
        model = build_mllm(FULL.mllm, layout(vocab, FULL.codebook_size))
    assert n_params(model) == parameter_count(FULL.mllm, vocab)
    assert n_params(model) == 6_738_415_616 + (vocab - 32000) * 4096 * 2


def test_full_detokenizer_is_sdxl_sized():
    with torch.device("meta"):
        unet, vae = build_unet(FULL.detokenizer), build_vae(FULL.detokenizer)
        adapter = CodeAdapter(FULL.detokenizer)
    # SDXL base 1.0: UNet 2,567,463,684 and VAE 83,653,863 parameters.
    assert n_params(unet) == 2_567_463_684
    assert n_params(vae) == 83_653_863
    assert FULL.detokenizer.latent_size == 128 and FULL.num_queries == 64
    assert adapter.null_prompt.shape == (1, 64, 2048)


def test_tiny_models_are_cpu_sized():
    vocab = 6 + TINY.codebook_size + TINY.text_vocab_size
    assert parameter_count(TINY.mllm, vocab) < 5_000_000
    assert n_params(VisualTokenizer(TINY.visual)) < 2_000_000
    assert n_params(build_unet(TINY.detokenizer)) < 5_000_000


def test_preset_round_trips_through_a_dict():
    assert Preset.from_dict(TINY.to_dict()) == TINY
    assert Preset.from_dict(FULL.to_dict()) == FULL


def test_inconsistent_presets_are_rejected():
    with pytest.raises(ValueError, match="disagree on Q"):
        dataclasses.replace(TINY, visual=dataclasses.replace(TINY.visual, num_queries=8))
    with pytest.raises(ValueError, match="divide by num_heads"):
        dataclasses.replace(TINY.mllm, num_heads=3)
    with pytest.raises(ValueError, match="unknown preset"):
        get_preset("huge")
