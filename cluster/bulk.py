"""Bulk offline generation: a Ray Data pipeline from a Parquet of prompts to a Parquet of stories.

    python -m cluster.bulk --prompts prompts.parquet --out DIR [--segments N] [--gallery]
                           [--config ray_config.yaml]
    ray job submit --working-dir . -- python -m cluster.bulk --prompts … --out …

    1. read the prompts (columns: caption, optional image bytes, optional story_id, optional seed)
    2. check the story ids across the file: the first row of an id wins, later ones are bad rows;
       skip the rows OUT already holds (exactly once: re-running resumes)
    3. tokenizer actors: caption (+ image) -> prompt ids (+ the image's features); bad rows carry
       their reason on
    4. MLLM actors (vLLM + sink): a batch of stories written together, continuous batching; the
       sink settings and the default checkpoint come from --config (ray_config.yaml), as serve's.
       Each picture comes out as its features (Q x D floats)
    5. de-tokenizer actors: every picture of the batch -> PNG, then commit: the batch's whole
       stories become one Parquet file, written to a temporary name and renamed into place, so a
       file is whole or absent; bad rows go to the errors table (``cluster/bulk_output.py``)

A job killed midway loses only the batches in flight; the rerun skips every committed story.
"""

from __future__ import annotations

import argparse
import hashlib
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from actors.features import from_bytes, to_bytes
from actors.mllm.sink import SinkSettings
from actors.tokenizer.text import caption_text
from cluster import mllm_config
from cluster.bulk_output import (
    ERRORS,
    atomic_write,
    cell_caption,
    cell_text,
    commit,
    committed,
    write_gallery,
)


@dataclass(frozen=True)
class BulkConfig:
    prompts: str
    out: str
    checkpoint: str
    segments: int = 10
    steps: int = 20
    guidance: float = 5.0  # as the service's default: the tiny de-tokenizer draws its characters with it
    temperature: float = 0.8
    top_p: float = 0.95
    stories_per_batch: int = 8  # stories one MLLM actor writes together
    mllm_actors: int = 1
    render_actors: int = 1
    sink: SinkSettings = field(default_factory=SinkSettings)

    def __post_init__(self) -> None:
        if self.segments < 1 or self.stories_per_batch < 1 or self.mllm_actors < 1 or self.render_actors < 1:
            raise ValueError("segments, stories_per_batch, mllm_actors and render_actors must be >= 1")


# -- 1-2. prompts, and what is already done ----------------------------------------------------
def story_ids(prompts: pa.Table) -> list[str]:
    """Each prompt's story id: its own column if given, else a hash of its content, so reruns agree."""

    def column(name: str) -> list:
        return prompts.column(name).to_pylist() if name in prompts.column_names else [None] * prompts.num_rows

    return [
        sid if isinstance(sid, str) and sid else _digest(f"{cell_text(cap)}\0".encode() + _bytes(img))[:16]
        for sid, cap, img in zip(column("story_id"), column("caption"), column("image"))
    ]


def _bytes(value) -> bytes:
    """A Parquet binary cell as bytes (pandas gives None or NA for a missing one)."""
    return value if isinstance(value, bytes) else b""


def _digest(data: bytes) -> str:
    return hashlib.sha1(data).hexdigest()


def _seed(text: str) -> int:
    """A stable 48-bit seed from a name: a story samples and renders the same in every run and batch."""
    return int(_digest(text.encode())[:12], 16)


def triage(
    ids: list[str], captions: list[str], stories: set, errors: set
) -> tuple[list[int], list[int], list[dict]]:
    """Rows to write, rows already done, and error rows for rows that may not take their story id.

    The first row of an id in the file wins; a later row with that id is an error. A row whose id
    and caption are committed is done (a rerun adds nothing); one that gives a committed id another
    caption is an error, so an id never gets a second story. A repeat is done once its own error
    row is committed, never by its first row's story: run_bulk commits these errors after the
    stories, so a repeat of the first row's caption cannot hide that row from a resumed run."""
    done_ids = {sid for sid, _ in stories | errors}
    first: dict[str, int] = {}
    todo, done, bad = [], [], []
    for row, (sid, caption) in enumerate(zip(ids, map(cell_caption, captions))):
        at = first.setdefault(sid, row)
        if (sid, caption) in errors or (at == row and (sid, caption) in stories):
            done.append(row)
        elif at != row:
            bad.append(
                {"story_id": sid, "caption": caption, "reason": f"story_id: repeated (first at row {at})"}
            )
        elif sid in done_ids:
            bad.append(
                {
                    "story_id": sid,
                    "caption": caption,
                    "reason": "story_id: already committed with another caption",
                }
            )
        else:
            todo.append(row)
    return todo, done, bad


# -- 3-5. the actor stages --------------------------------------------------------------------------
class Tokenize:
    """Caption (+ image) -> prompt ids, and a start image's features by the position of its first
    query row (``given_at``, ``given``: that many ``actors.features`` byte strings, which cross
    Ray Data's Arrow blocks as they are)."""

    def __init__(self, checkpoint: str):
        from actors.tokenizer.prompts import PromptBuilder

        self.builder = PromptBuilder(checkpoint)

    def __call__(self, batch):
        from actors.errors import InputError

        captions = [cell_caption(c) for c in batch["caption"]]
        images = list(batch["image"]) if "image" in batch.columns else [None] * len(batch)
        has_image = [len(_bytes(i)) > 0 for i in images]
        features = iter(self.builder.image_features([i for i, ok in zip(images, has_image) if ok]))
        prompts, given_at, given, errors = [], [], [], []
        for caption, ids, ok in zip(captions, self.builder.caption_ids(captions), has_image):
            start = next(features) if ok else None  # consumed in row order, whatever happens below
            try:
                if not caption:
                    raise InputError("caption", "is missing or empty")
                if isinstance(start, InputError):
                    raise start
                prompt = self.builder.prompt(self.builder.check_caption(ids, "caption"), start)
                prompts.append(prompt.ids)
                given_at.append(list(prompt.given))
                given.append([to_bytes(f) for f in prompt.given.values()])
                errors.append("")
            except InputError as e:
                prompts.append([])
                given_at.append([])
                given.append([])
                errors.append(str(e))
        batch["caption"], batch["prompt_ids"], batch["error"] = captions, prompts, errors
        batch["given_at"], batch["given"] = given_at, given
        return batch.drop(columns=[c for c in ("image",) if c in batch.columns])


class Write:
    """A batch of stories written together; each picture leaves as its features' bytes."""

    def __init__(self, checkpoint: str, sink: dict, segments: int, temperature: float, top_p: float):
        from actors.checkpoint import part_dir, read_manifest
        from actors.mllm.driver import StoryDriver
        from actors.mllm.engine import EngineConfig, StoryEngine
        from actors.tokenizer.text import load_text_tokenizer

        # The longest story: the opening plus the segments asked for.
        self.engine = StoryEngine(
            EngineConfig(checkpoint, SinkSettings(**sink), max_story_segments=segments + 1)
        )
        self.driver = StoryDriver(self.engine)
        self.text = load_text_tokenizer(part_dir(checkpoint, "tokenizer"))
        manifest = read_manifest(checkpoint)
        self.shape = (manifest.num_queries, manifest.feature_dim)
        self.segments, self.temperature, self.top_p = segments, temperature, top_p

    def __call__(self, batch):
        from actors.mllm.engine import Sampling

        seeds = batch["seed"] if "seed" in batch.columns else [_seed(sid) for sid in batch["story_id"]]
        rows = zip(
            batch["story_id"], batch["prompt_ids"], batch["given_at"], batch["given"], batch["error"], seeds
        )
        for sid, prompt, given_at, given, error, seed in rows:
            if not error:
                pictures = {int(at): from_bytes(f, *self.shape) for at, f in zip(given_at, given)}
                self.engine.submit(
                    sid,
                    list(prompt),
                    self.segments,
                    Sampling(self.temperature, self.top_p, int(seed)),
                    given=pictures or None,
                )
        written = self.driver.drain().pictures
        captions, features = [], []
        for sid, opening in zip(batch["story_id"], batch["caption"]):
            events = written.get(sid, [])
            captions.append([caption_text(self.text, ev.caption_ids, opening) for ev in events])
            features.append([to_bytes(ev.features) for ev in events])
        batch["captions"], batch["features"] = captions, features
        return batch.drop(columns=["prompt_ids", "given_at", "given"])

    def __del__(self):
        if getattr(self, "engine", None) is not None:
            self.engine.shutdown()


class Render:
    """Renders a batch, then commits it from the same actor call.

    Committing here, not in a stage of its own, is what makes a kill lose only the batches in
    flight: Ray Data ran a separate light commit stage only once every batch had been rendered, so
    a kill lost everything (docs/bulk.md#exactly-once).
    """

    def __init__(self, checkpoint: str, steps: int, guidance: float, out: str, segments: int):
        from actors.checkpoint import part_dir, read_manifest
        from actors.detokenizer.model import Detokenizer

        self.model = Detokenizer.from_pretrained(part_dir(checkpoint, "detokenizer"))
        manifest = read_manifest(checkpoint)
        self.shape = (manifest.num_queries, manifest.feature_dim)
        self.steps, self.guidance, self.out, self.segments = steps, guidance, out, segments

    def __call__(self, batch):
        from actors.imageio import to_png

        jobs = [(row, k, f) for row, story in enumerate(batch["features"]) for k, f in enumerate(story)]
        seeds = [_seed(f"{batch['story_id'].iloc[row]}/{k}") for row, k, _ in jobs]
        features = [from_bytes(f, *self.shape) for _, _, f in jobs]
        images = self.model.render_seeded(features, seeds, self.steps, self.guidance) if jobs else []
        pngs, rows = [[] for _ in range(len(batch))], [[] for _ in range(len(batch))]
        for (row, _, _), img, picture in zip(jobs, images, features):
            pngs[row].append(to_png(img))
            rows[row].append(picture.tolist())  # Q rows of D: the table's column, decoded once
        batch["pngs"], batch["features"] = pngs, rows
        return commit(batch, self.out, self.segments)


# -- the pipeline -----------------------------------------------------------------------------------
def run_bulk(config: BulkConfig) -> dict:
    out = Path(config.out)
    started = time.time()
    # The driver reads the prompts (one small row each): read_parquet's file listing wants a whole
    # CPU, which the actor pools hold on a small machine. Ids are checked here, across the file.
    prompts = pq.read_table(config.prompts)
    if "caption" not in prompts.column_names:
        raise ValueError(f"{config.prompts} has no 'caption' column (columns: {prompts.column_names})")
    ids = story_ids(prompts)
    todo, done, bad = triage(ids, prompts.column("caption").to_pylist(), *committed(out))
    if "story_id" in prompts.column_names:
        prompts = prompts.drop_columns(["story_id"])
    prompts = prompts.append_column("story_id", pa.array(ids, pa.string())).take(pa.array(todo, pa.int64()))
    written = _generate(config, prompts) if todo else {"stories": 0, "errors": 0}  # nothing to do: no actors
    atomic_write(out / "errors", pa.Table.from_pylist(bad, schema=ERRORS))  # after the stories: see triage
    return {
        "skipped": len(done),
        "stories": written["stories"],
        "errors": written["errors"] + len(bad),
        "seconds": time.time() - started,
    }


def _generate(config: BulkConfig, prompts: pa.Table) -> dict:
    """The Ray Data pipeline over the rows to write; returns how many stories and bad rows it committed."""
    import ray
    from ray.data import ActorPoolStrategy

    dataset = (
        ray.data.from_arrow(prompts)
        .map_batches(
            Tokenize,
            fn_constructor_args=(config.checkpoint,),
            batch_size=config.stories_per_batch,
            batch_format="pandas",
            compute=ActorPoolStrategy(size=1),
            num_cpus=0.25,
        )
        .map_batches(
            Write,
            fn_constructor_args=(
                config.checkpoint,
                asdict(config.sink),
                config.segments,
                config.temperature,
                config.top_p,
            ),
            batch_size=config.stories_per_batch,
            batch_format="pandas",
            compute=ActorPoolStrategy(size=config.mllm_actors),
            num_cpus=1,
        )
        .map_batches(
            Render,
            fn_constructor_args=(
                config.checkpoint,
                config.steps,
                config.guidance,
                config.out,
                config.segments,
            ),
            batch_size=config.stories_per_batch,
            batch_format="pandas",
            compute=ActorPoolStrategy(size=config.render_actors),
            num_cpus=0.5,
        )
    )
    written = dataset.to_pandas()
    return {k: int(written[k].sum()) if len(written) else 0 for k in ("stories", "errors")}


# -- the command: `seedstory bulk` and `python -m cluster.bulk` ------------------------------------------
def add_command(commands) -> argparse.ArgumentParser:
    """``seedstory bulk``, registered on the ``seedstory`` parser's subcommands."""
    bulk_parser = commands.add_parser(
        "bulk",
        help="Parquet of prompts -> Parquet of stories, as a Ray Data job (also: "
        "python -m cluster.bulk under `ray job submit`)",
    )
    add_arguments(bulk_parser)
    bulk_parser.set_defaults(func=run_cli)
    return bulk_parser


def parser() -> argparse.ArgumentParser:
    """``python -m cluster.bulk`` (as ``ray job submit`` runs it): the same options."""
    bulk_parser = argparse.ArgumentParser(
        prog="seedstory bulk", description="Parquet of prompts -> Parquet of stories."
    )
    add_arguments(bulk_parser)
    return bulk_parser


def add_arguments(bulk_parser: argparse.ArgumentParser) -> None:
    bulk_parser.add_argument(
        "--prompts", required=True, help="Parquet with a caption column (+ image, story_id, seed)"
    )
    bulk_parser.add_argument("--out", required=True)
    bulk_parser.add_argument(
        "--ckpt", help="checkpoint folder (default: the config's: the embedded tiny model)"
    )
    bulk_parser.add_argument("--segments", type=int, default=10)
    bulk_parser.add_argument("--steps", type=int, default=20)
    bulk_parser.add_argument(
        "--guidance", type=float, default=BulkConfig.guidance, help="classifier-free guidance"
    )
    bulk_parser.add_argument("--stories-per-batch", type=int, default=8)
    bulk_parser.add_argument("--mllm-actors", type=int, default=1)
    bulk_parser.add_argument("--render-actors", type=int, default=1)
    bulk_parser.add_argument("--gallery", action="store_true", help="also write gallery.html")
    mllm_config.add_arguments(bulk_parser)


def main(argv: list[str] | None = None) -> None:
    run_cli(parser().parse_args(argv))


def run_cli(args: argparse.Namespace) -> None:
    import ray

    out = Path(args.out)
    ckpt, sink = mllm_config.resolve(args)
    config = BulkConfig(
        args.prompts,
        str(out),
        str(_checkpoint(ckpt, args.ckpt, out).resolve()),
        args.segments,
        args.steps,
        args.guidance,
        stories_per_batch=args.stories_per_batch,
        mllm_actors=args.mllm_actors,
        render_actors=args.render_actors,
        sink=sink,
    )
    ray.init(include_dashboard=False, log_to_driver=False)  # joins RAY_ADDRESS under `ray job submit`
    summary = run_bulk(config)
    print(
        f"bulk: {summary['stories']} stories written, {summary['errors']} bad rows, {summary['skipped']} "
        f"already done, in {summary['seconds']:.1f}s -> {out / 'segments'}"
    )
    if args.gallery:
        print(f"gallery: {write_gallery(out)}")


def _checkpoint(ckpt: Path, given: str | None, out: Path) -> Path:
    """The checkpoint to write with. The embedded model, when a clone lacks it and no --ckpt names
    it, is replaced by a random-init one, as the demo does, so that the job still runs."""
    from cluster.demo import EMBEDDED_CHECKPOINT, ensure_checkpoint

    if given or ckpt.resolve() != EMBEDDED_CHECKPOINT.resolve():
        return ckpt
    return ensure_checkpoint(None, out)


if __name__ == "__main__":
    main()
