"""The text tokenizer (a BPE trained on captions) and the layout of the shared vocabulary.

The MLLM's vocabulary is: special tokens, then K visual tokens (contiguous ids), then BPE
text tokens. ``TokenLayout`` is the plain-data description of it that every other part
(decoding grammar, sink policy, API) uses; it is saved in the checkpoint manifest.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

SPECIALS = ("<pad>", "<s>", "</s>", "<unk>", "<img>", "</img>")


def visual_token(code: int) -> str:
    return f"<v{code:05d}>"


@dataclass(frozen=True)
class TokenLayout:
    pad: int
    bos: int
    eos: int
    unk: int
    boi: int  # <img>
    eoi: int  # </img>
    visual_base: int  # id of visual code 0
    num_codes: int  # K
    vocab_size: int

    def visual_id(self, code: int) -> int:
        """Visual code i -> its token id."""
        if not 0 <= code < self.num_codes:
            raise ValueError(f"visual code {code} outside [0, {self.num_codes})")
        return self.visual_base + code

    def visual_code(self, token_id: int) -> int:
        """Token id -> visual code i (the inverse of ``visual_id``)."""
        if not self.is_visual(token_id):
            raise ValueError(f"token id {token_id} is not a visual token")
        return token_id - self.visual_base

    def is_visual(self, token_id: int) -> bool:
        return self.visual_base <= token_id < self.visual_base + self.num_codes

    @property
    def text_range(self) -> tuple[int, int]:
        """Ids [lo, hi) of ordinary caption tokens (BPE pieces)."""
        return self.visual_base + self.num_codes, self.vocab_size


def train_text_tokenizer(captions: Iterable[str], vocab_size: int, num_codes: int):
    """Train a byte-level BPE on captions; returns a ``PreTrainedTokenizerFast``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = list(SPECIALS) + [visual_token(i) for i in range(num_codes)]
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size + len(specials),
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(captions, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        additional_special_tokens=["<img>", "</img>"],
    )


def load_text_tokenizer(path: str | Path):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast.from_pretrained(str(path))


def token_layout(tokenizer, num_codes: int) -> TokenLayout:
    ids = tokenizer.convert_tokens_to_ids
    layout = TokenLayout(
        pad=ids("<pad>"),
        bos=ids("<s>"),
        eos=ids("</s>"),
        unk=ids("<unk>"),
        boi=ids("<img>"),
        eoi=ids("</img>"),
        visual_base=ids(visual_token(0)),
        num_codes=num_codes,
        vocab_size=len(tokenizer),
    )
    # The layout promises contiguous visual ids; check the trained vocabulary keeps it.
    if ids(visual_token(num_codes - 1)) != layout.visual_base + num_codes - 1:
        raise ValueError("visual tokens are not contiguous in the tokenizer vocabulary")
    return layout


def segment_ids(layout: TokenLayout, caption_ids: list[int], codes: Iterable[int] | None) -> list[int]:
    """One story segment as ids: caption ids, then ``<img> v.. </img>`` when codes are given."""
    if codes is None:
        return list(caption_ids)
    return [*caption_ids, layout.boi, *(layout.visual_id(c) for c in codes), layout.eoi]


def encode_segment(tokenizer, layout: TokenLayout, caption: str, codes: Iterable[int] | None) -> list[int]:
    """``segment_ids`` for a caption given as text."""
    return segment_ids(layout, tokenizer.encode(caption, add_special_tokens=False), codes)


def split_segments(layout: TokenLayout, ids: Iterable[int]) -> list[tuple[list[int], list[int]]]:
    """Parse ids back into (caption ids, visual codes) per segment; the inverse of ``encode_segment``."""
    segments: list[tuple[list[int], list[int]]] = []
    caption: list[int] = []
    codes: list[int] | None = None
    for token in ids:
        if token in (layout.bos, layout.eos, layout.pad):
            continue
        if token == layout.boi:
            codes = []
        elif token == layout.eoi:
            segments.append((caption, codes or []))
            caption, codes = [], None
        elif codes is not None:
            codes.append(layout.visual_code(token))
        else:
            caption.append(token)
    if caption:
        segments.append((caption, []))
    return segments


def caption_text(tokenizer, caption_ids: list[int], opening: str = "") -> str:
    """A written caption as text. The engine reports an empty caption for the one the prompt ended
    with (the client's opening caption, whose picture came first): that one is ``opening``."""
    return tokenizer.decode(caption_ids).strip() if caption_ids else opening


def written_captions(layout: TokenLayout, ids: Iterable[int]) -> list[list[int]]:
    """Caption ids of every segment whose picture has begun: an ``<img>`` makes its caption final."""
    captions: list[list[int]] = []
    caption: list[int] = []
    for token in ids:
        if token == layout.boi:
            captions.append(caption)
            caption = []
        elif token not in (layout.bos, layout.eos, layout.pad, layout.eoi) and not layout.is_visual(token):
            caption.append(token)
    return captions
