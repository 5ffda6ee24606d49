"""Ray Data inputs of the training stages: pictures from StoryStream windows, and the MLLM's
pre-tokenized windows (ids, and each picture's features: the regression targets), made with
``map_batches``.

Both readers go through Ray Data ``read_parquet``, so each Ray Train worker streams its own
shard (``get_dataset_shard``) instead of the driver loading the set.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa

from training.storystream import read_dataset

TOKENS_SCHEMA = pa.schema(
    [
        pa.field("story_id", pa.string()),
        pa.field("window", pa.int32()),
        pa.field("input_ids", pa.list_(pa.int32())),
        pa.field("loss_from", pa.int32()),  # first position whose token carries the loss
        # The window's pictures' features, in order: float16 (pictures, Q, D), row-major bytes.
        pa.field("features", pa.binary()),
    ]
)
FEATURE_DTYPE = np.float16  # half the Parquet; the targets are unit vectors, far coarser than fp16


def image_dataset(data: str | Path):
    """One row per picture: {"png": bytes}."""
    return read_dataset(data).flat_map(lambda row: [{"png": png} for png in row["images"]])


def endless_batches(shard, batch_size: int, seed: int):
    """Numpy batches from a Ray Data shard, epoch after epoch, shuffled differently each epoch."""
    epoch = 0
    while True:
        batches = 0
        for batch in shard.iter_batches(
            batch_size=batch_size,
            batch_format="numpy",
            drop_last=True,
            local_shuffle_buffer_size=batch_size * 8,
            local_shuffle_seed=seed + epoch,
        ):
            batches += 1
            yield batch
        if not batches:  # else it would spin on empty epochs for ever
            raise ValueError(
                f"a worker's shard holds fewer rows than one batch of {batch_size}: "
                "lower --batch-size or use fewer --workers"
            )
        epoch += 1


def image_batches(shard, batch_size: int, seed: int):
    """Endless shuffled batches of pictures as float tensors (B, 3, H, W) in [-1, 1]."""
    from actors.imageio import decode_image, to_tensor

    for batch in endless_batches(shard, batch_size, seed):
        yield to_tensor([decode_image(png) for png in batch["png"]])


def token_batches(shard, batch_size: int, seed: int, pad_id: int, picture_shape: tuple[int, int]):
    """Endless shuffled batches of windows: {"input_ids", "attention_mask", "loss_mask"} (B, T),
    right-padded, and "features": per window its pictures' features (pictures, Q, D) float32."""
    import torch

    for batch in endless_batches(shard, batch_size, seed):
        windows = pad_windows(list(batch["input_ids"]), list(batch["loss_from"]), pad_id, torch)
        windows["features"] = [
            torch.from_numpy(window_features(data, picture_shape)) for data in batch["features"]
        ]
        yield windows


def bytes_column(values: list[bytes]) -> np.ndarray:
    """A batch column of byte strings as an object array: ``np.asarray`` would make fixed-width
    bytes, which strip trailing zero bytes (a float16 0.0 ends in them)."""
    column = np.empty(len(values), dtype=object)
    column[:] = values
    return column


def window_features(data: bytes, picture_shape: tuple[int, int]) -> np.ndarray:
    """A window's ``features`` bytes -> float32 (pictures, Q, D)."""
    return np.frombuffer(data, dtype=FEATURE_DTYPE).reshape(-1, *picture_shape).astype(np.float32)


def pad_windows(rows: list, loss_from: list, pad_id: int, torch) -> dict:
    longest = max(len(r) for r in rows)
    ids = np.full((len(rows), longest), pad_id, dtype=np.int64)
    attn = np.zeros_like(ids)
    loss = np.zeros_like(ids)
    for i, (r, start) in enumerate(zip(rows, loss_from)):
        ids[i, : len(r)], attn[i, : len(r)], loss[i, start : len(r)] = r, 1, 1
    return {
        "input_ids": torch.from_numpy(ids),
        "attention_mask": torch.from_numpy(attn),
        "loss_mask": torch.from_numpy(loss),
    }


class Pretokenize:
    """map_batches actor: windows (captions + PNGs) -> token rows, with the checkpoint's own tokenizers.

    Uses ``PromptBuilder`` (the TokenizerPool's core), so training ids equal serving ids.
    """

    def __init__(self, ckpt: str):
        from actors.tokenizer.prompts import PromptBuilder

        self.builder = PromptBuilder(ckpt)

    def __call__(self, batch: dict) -> dict:
        out: dict[str, list] = {
            "story_id": [],
            "window": [],
            "input_ids": [],
            "loss_from": [],
            "features": [],
        }
        for sid, window, captions, pngs in zip(
            batch["story_id"], batch["window"], batch["captions"], batch["images"]
        ):
            row = self.window(list(captions), list(pngs))
            if row is not None:  # a window the model could never write (caption too long, bad picture)
                out["story_id"].append(sid)
                out["window"].append(window)
                out["input_ids"].append(np.asarray(row[0], dtype=np.int32))
                out["loss_from"].append(row[1])
                out["features"].append(row[2])
        features = bytes_column(out.pop("features"))
        return {**{k: v if k == "input_ids" else np.asarray(v) for k, v in out.items()}, "features": features}

    def window(self, captions: list[str], pngs: list[bytes]) -> tuple[list[int], int, bytes] | None:
        """``<s> cap0 <img> q.. </img> cap1 <img> q.. </img> ...``, the position where the loss
        starts, and the pictures' features."""
        from actors.tokenizer.text import segment_ids

        layout, limit = self.builder.manifest.tokens, self.builder.manifest.preset.max_caption_tokens
        caption_ids = self.builder.caption_ids(captions)
        features = self.builder.image_features(pngs)
        if any(isinstance(f, Exception) for f in features) or any(
            not 0 < len(c) <= limit for c in caption_ids
        ):
            return None
        ids = [layout.bos]
        for cap in caption_ids:
            ids += segment_ids(layout, cap, picture=True)
        # The opening caption is the user's: the loss starts at the first picture's <img>.
        return ids, 1 + len(caption_ids[0]), np.stack(features).astype(FEATURE_DTYPE).tobytes()


def pretokenize(data: str | Path, ckpt: str | Path, out: str | Path, batch_size: int = 32) -> Path:
    """Windows -> token Parquet in ``out`` (written to a temporary folder, then moved into place)."""
    from ray.data import ActorPoolStrategy

    out = Path(out)
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    dataset = read_dataset(data).map_batches(
        Pretokenize,
        fn_constructor_kwargs={"ckpt": str(ckpt)},
        batch_size=batch_size,
        batch_format="numpy",
        compute=ActorPoolStrategy(size=1),
        num_cpus=0.5,
    )
    dataset.write_parquet(str(tmp))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def whole_stories(tokens):
    """Token windows (a Ray dataset) -> one row per story: its windows joined in order, the ``<s>``
    of every window after the first dropped, and their pictures' ``features`` joined in the same
    order. Windows are consecutive and never overlap (``storystream.chunk_windows``); a story is
    cut at its first missing window."""
    return tokens.groupby("story_id").map_groups(join_windows, batch_format="numpy")


def join_windows(group: dict) -> dict:
    order = np.argsort(group["window"])
    ids: list[int] = []
    features: list[bytes] = []
    for k, i in enumerate(order):
        if group["window"][i] != k:
            break
        ids += list(group["input_ids"][i][1:] if k else group["input_ids"][i])
        features.append(bytes(group["features"][i]))
    joined = bytes_column([b"".join(features)])
    return {
        "story_id": group["story_id"][:1],
        "input_ids": [np.asarray(ids, dtype=np.int32)],
        "features": joined,
    }


def token_dataset(tokens: str | Path):
    import ray.data

    files = sorted(str(f) for f in Path(tokens).glob("*.parquet"))
    if not files:
        raise FileNotFoundError(f"no token Parquet in {tokens}")
    return ray.data.read_parquet(files)
