"""The text tokenizer (a BPE trained on captions) and the layout of the shared vocabulary.

The MLLM's vocabulary is: special tokens, then a picture's Q query tokens (contiguous ids), then
BPE text tokens. ``TokenLayout`` is the plain-data description of it that every other part
(decoding grammar, sink policy, API) uses; it is saved in the checkpoint manifest.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

SPECIALS = ("<pad>", "<s>", "</s>", "<unk>", "<img>", "</img>")


def query_token(row: int) -> str:
    """The token of a picture's query row ``row`` (SEED-Story's ``<img_00000>`` ...)."""
    return f"<img_{row:05d}>"


@dataclass(frozen=True)
class TokenLayout:
    pad: int
    bos: int
    eos: int
    unk: int
    boi: int  # <img>
    eoi: int  # </img>
    query_base: int  # id of query row 0
    num_queries: int  # Q
    vocab_size: int

    @property
    def query_ids(self) -> list[int]:
        """A picture's Q query ids, in order: every picture has the same ones (its rows are what
        differ), so a story's ids stay a function of its captions alone."""
        return list(range(self.query_base, self.query_base + self.num_queries))

    @property
    def picture_ids(self) -> list[int]:
        """A whole picture as ids: ``<img> q_0 .. q_{Q-1} </img>``."""
        return [self.boi, *self.query_ids, self.eoi]

    def is_query(self, token_id: int) -> bool:
        return self.query_base <= token_id < self.query_base + self.num_queries

    @property
    def text_range(self) -> tuple[int, int]:
        """Ids [lo, hi) of ordinary caption tokens (BPE pieces)."""
        return self.query_base + self.num_queries, self.vocab_size


def train_text_tokenizer(captions: Iterable[str], vocab_size: int, num_queries: int):
    """Train a byte-level BPE on captions; returns a ``PreTrainedTokenizerFast``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = list(SPECIALS) + [query_token(i) for i in range(num_queries)]
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


def token_layout(tokenizer, num_queries: int) -> TokenLayout:
    ids = tokenizer.convert_tokens_to_ids
    layout = TokenLayout(
        pad=ids("<pad>"),
        bos=ids("<s>"),
        eos=ids("</s>"),
        unk=ids("<unk>"),
        boi=ids("<img>"),
        eoi=ids("</img>"),
        query_base=ids(query_token(0)),
        num_queries=num_queries,
        vocab_size=len(tokenizer),
    )
    # The layout promises contiguous query ids; check the trained vocabulary keeps it.
    if ids(query_token(num_queries - 1)) != layout.query_base + num_queries - 1:
        raise ValueError("query tokens are not contiguous in the tokenizer vocabulary")
    return layout


def segment_ids(layout: TokenLayout, caption_ids: list[int], picture: bool) -> list[int]:
    """One story segment as ids: caption ids, then ``<img> q.. </img>`` when it has its picture."""
    return [*caption_ids, *layout.picture_ids] if picture else list(caption_ids)


def encode_segment(tokenizer, layout: TokenLayout, caption: str, picture: bool) -> list[int]:
    """``segment_ids`` for a caption given as text."""
    return segment_ids(layout, tokenizer.encode(caption, add_special_tokens=False), picture)


def split_segments(layout: TokenLayout, ids: Iterable[int]) -> list[tuple[list[int], bool]]:
    """Parse ids back into (caption ids, whether its picture is complete) per segment; the inverse of
    ``encode_segment``."""
    segments: list[tuple[list[int], bool]] = []
    caption: list[int] = []
    for token in ids:
        if token == layout.eoi:
            segments.append((caption, True))
            caption = []
        elif token not in (layout.bos, layout.eos, layout.pad, layout.boi) and not layout.is_query(token):
            caption.append(token)
    if caption:
        segments.append((caption, False))
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
        elif token not in (layout.bos, layout.eos, layout.pad, layout.eoi) and not layout.is_query(token):
            caption.append(token)
    return captions
