"""``seedstory eval``: long stories under each sink mode, judged against StoryWorld's ground truth.

For each mode (dense, window, streaming, multimodal) the same held-out openings are written
to ``segments`` pictures by the vLLM story engine, with the same sampling seeds, and every
picture is rendered by the de-tokenizer with the same seed. Each segment is judged:

- caption validity: the caption parses under the StoryWorld grammar (``parse_caption``);
- hero consistency: the caption names the story's hero, and the picture shows the hero:
  among pictures drawn by the ground-truth renderer with every character as the hero (the
  caption's place, action and friends fixed), the nearest to the generated one has the
  story's hero, so colour and shape both count;
- place agreement: likewise, the nearest ground-truth picture over every place has the
  caption's place;
- Fréchet distance between generated and real held-out pictures, in the visual tokenizer's
  feature space (mean encoder output);

plus generation time and peak KV bytes. Outputs: ``results.json``, ``table.md`` (the shape of
the paper's Table 2) and ``metrics.png`` (each metric against the segment index, per mode).
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass, field, replace
from functools import lru_cache
from pathlib import Path

import numpy as np

from actors.mllm.sink import MODES, NEIGHBOURHOODS, SinkSettings
from actors.tokenizer.text import caption_text
from training.storyworld import CHARACTERS, PLACES, Segment, draw_segment, parse_caption

FD_BIN = 5  # segments per bin of the per-segment Fréchet distance (50 pictures per index is too few)
FD_RESAMPLES = 200  # story bootstrap for the Fréchet distance's standard error
CHECKS = ("valid", "hero", "place")


@dataclass(frozen=True)
class EvalSettings:
    stories: int = 50
    segments: int = 25
    modes: tuple[str, ...] = MODES
    steps: int = 10             # denoising steps per picture
    guidance: float = 5.0       # classifier-free guidance: the tiny de-tokenizer draws its characters with it
    seed: int = 0
    temperature: float = 0.7
    top_p: float = 0.9
    kv_cache_bytes: int = 1 << 30
    # Every mode's sink tokens, window and neighbourhoods (`seedstory eval` takes them from the
    # Serve config, as serve does); its mode is unused: the eval runs each of ``modes``.
    sink: SinkSettings = field(default_factory=SinkSettings)

    def __post_init__(self) -> None:
        bad = [m for m in self.modes if m not in MODES]
        if bad or self.stories < 2 or self.segments < 1:
            raise ValueError(f"eval: modes must be among {MODES}, stories >= 2, segments >= 1 (got {bad})")


# -- judging one segment (plain numpy + the ground-truth renderer) ----------------------------------

@lru_cache(maxsize=8192)
def _truth(seg: Segment, size: int) -> np.ndarray:
    return np.asarray(draw_segment(seg, size), dtype=np.float32)


def nearest(picture: np.ndarray, candidates: list[Segment]) -> Segment:
    """The candidate whose ground-truth picture is nearest (pixel MSE) to ``picture`` (H, W, 3)."""
    size = picture.shape[0]
    errors = [float(((_truth(c, size) - picture) ** 2).mean()) for c in candidates]
    return candidates[int(np.argmin(errors))]


def judge(caption: str, picture: np.ndarray, hero: str) -> dict:
    """The three per-segment checks for one caption and its picture (H, W, 3 uint8/float)."""
    seg = parse_caption(caption)
    if seg is None:
        return {"valid": 0.0, "hero": 0.0, "place": 0.0}
    picture = np.asarray(picture, dtype=np.float32)
    places = [Segment(seg.hero, seg.others, p.name, seg.action) for p in PLACES]
    shown_place = nearest(picture, places).place
    return {"valid": 1.0, "hero": float(seg.hero == hero and _shown_hero(seg, picture) == hero),
            "place": float(shown_place == seg.place)}


def shown_hero(caption: str, picture: np.ndarray) -> str | None:
    """Whom ``judge``'s hero check sees as the hero of ``picture`` (None: the caption does not
    parse). ``judge`` says only right or wrong; this says which character a wrong picture drew."""
    seg = parse_caption(caption)
    return None if seg is None else _shown_hero(seg, np.asarray(picture, dtype=np.float32))


def _shown_hero(seg: Segment, picture: np.ndarray) -> str:
    """The hero among every character not already in the scene, by the nearest ground-truth picture."""
    heroes = [Segment(c.name, seg.others, seg.place, seg.action) for c in CHARACTERS if c.name not in seg.others]
    return nearest(picture, heroes).hero


def frechet(a: np.ndarray, b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to feature sets a (N, d) and b (M, d)."""
    mu1, mu2 = a.mean(0), b.mean(0)
    c1, c2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    s1 = _sqrt_psd(c1)
    cross = np.linalg.eigvalsh(s1 @ c2 @ s1).clip(min=0)  # tr sqrt(C1 C2) = tr sqrt(C1^½ C2 C1^½)
    return float(((mu1 - mu2) ** 2).sum() + np.trace(c1) + np.trace(c2) - 2 * np.sqrt(cross).sum())


def _sqrt_psd(c: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh(c)
    return (v * np.sqrt(w.clip(min=0))) @ v.T


# -- the held-out set ----------------------------------------------------------------------------

@dataclass
class HeldOut:
    openings: list[str]
    heroes: list[str]
    pictures: list[list[bytes]]  # real pictures per story, per segment (PNG/JPEG bytes)


def read_heldout(folder: Path, stories: int, segments: int) -> HeldOut:
    lines = (folder / "storyworld.jsonl").read_text().splitlines()
    truth = (folder / "truth.jsonl").read_text().splitlines()
    if len(lines) < stories:
        raise ValueError(f"{folder} has {len(lines)} stories; the eval asks for {stories}")
    rows = [json.loads(x) for x in lines[:stories]]
    if min(len(r["captions"]) for r in rows) < segments:
        raise ValueError(f"{folder}: held-out stories are shorter than {segments} segments")
    return HeldOut(openings=[r["captions"][0] for r in rows],
                   heroes=[json.loads(t)["hero"] for t in truth[:stories]],
                   pictures=[[(folder / "images" / p).read_bytes() for p in r["images"][:segments]] for r in rows])


# -- generating ----------------------------------------------------------------------------------

def write_stories(ckpt: Path, mode: str, prompts: list[list[int]], s: EvalSettings) -> dict:
    """All stories under one sink mode, batched in one engine: codes, caption ids, time, peak KV."""
    from actors.mllm.driver import StoryDriver
    from actors.mllm.engine import EngineConfig, Sampling, StoryEngine

    engine = StoryEngine(EngineConfig(checkpoint=str(ckpt), sink=replace(s.sink, mode=mode),
                                      max_stories=len(prompts), kv_cache_bytes=s.kv_cache_bytes,
                                      max_story_segments=s.segments + 1))
    try:
        for i, prompt in enumerate(prompts):
            engine.submit(str(i), prompt, s.segments, Sampling(s.temperature, s.top_p, seed=s.seed + i))
        run = StoryDriver(engine).drain()
        return {"segments": {int(sid): pictures for sid, pictures in run.pictures.items()}, "seconds": run.seconds,
                "tokens": run.tokens, "sink": asdict(engine.config.sink),
                "peak_kv_bytes": run.peak_blocks_in_use * engine.block_bytes()}
    finally:
        engine.shutdown()


def render_all(detok, codes: list[list[int]], seeds: list[int], s: EvalSettings, batch: int = 16) -> tuple[list, float]:
    t0, pictures = time.perf_counter(), []
    for i in range(0, len(codes), batch):
        pictures += detok.render_seeded(codes[i:i + batch], seeds[i:i + batch], steps=s.steps, guidance=s.guidance)
    return pictures, time.perf_counter() - t0


# -- one mode, then the whole table ----------------------------------------------------------------

def evaluate_mode(ckpt: Path, mode: str, held: HeldOut, builder, detok, s: EvalSettings) -> dict:
    prompts = [builder.prompt(ids, None) for ids in builder.caption_ids(held.openings)]
    run = write_stories(ckpt, mode, prompts, s)
    keys = [(i, ev.index) for i, evs in run["segments"].items() for ev in evs]
    codes = [ev.codes for evs in run["segments"].values() for ev in evs]
    # The same picture seed for the same (story, segment) in every mode.
    pictures, render_s = render_all(detok, codes, [s.seed * 100_003 + i * 1000 + k for i, k in keys], s)
    per_seg = {k: {name: [] for name in CHECKS} for k in range(s.segments)}
    per_story = {i: {name: [] for name in CHECKS} for i in range(len(prompts))}
    for (i, k), pic in zip(keys, pictures):
        ev = run["segments"][i][k]
        text = caption_text(builder.text, ev.caption_ids, held.openings[i])
        for name, v in judge(text, np.asarray(pic), held.heroes[i]).items():
            per_seg[k][name].append(v)
            per_story[i][name].append(v)
    return {"mode": mode, "sink": run["sink"], "pictures": pictures, "keys": keys, "per_segment": per_seg, "per_story": per_story,
            "seconds": run["seconds"], "render_seconds": render_s, "tokens": run["tokens"],
            "peak_kv_bytes": run["peak_kv_bytes"], "complete": sum(len(v) == s.segments
                                                                   for v in run["segments"].values())}


def image_features(visual, pictures: list) -> np.ndarray:
    import torch

    from actors.imageio import to_tensor

    out = []
    with torch.no_grad():
        for i in range(0, len(pictures), 64):
            out.append(visual.features(to_tensor(pictures[i:i + 64])).numpy())
    return np.concatenate(out)


def run_eval(ckpt: Path, heldout: Path, out: Path, s: EvalSettings = EvalSettings(), card: bool = False) -> str:
    from actors.checkpoint import part_dir, read_manifest
    from actors.detokenizer.model import Detokenizer
    from actors.imageio import decode_image, resize_square
    from actors.tokenizer.prompts import PromptBuilder

    out.mkdir(parents=True, exist_ok=True)
    size = read_manifest(ckpt).image_size
    held = read_heldout(heldout, s.stories, s.segments)
    builder = PromptBuilder(str(ckpt))
    detok = Detokenizer.from_pretrained(part_dir(ckpt, "detokenizer"))
    real = [[resize_square(decode_image(b), size) for b in story] for story in held.pictures]
    real_feats = image_features(builder.visual, [p for story in real for p in story])  # story-major, like keys
    results = []
    for mode in s.modes:
        print(f"[eval] {mode}: {s.stories} stories x {s.segments} segments", flush=True)
        r = evaluate_mode(ckpt, mode, held, builder, detok, s)
        r["fd"], r["fd_se"], r["fd_by_bin"] = fd_scores(builder.visual, r, real_feats, s)
        results.append(summarise(r, s))
        print(f"[eval] {mode}: {json.dumps(results[-1]['summary'])}", flush=True)
    table = write_outputs(out, results, s, heldout_source(heldout))
    if card:
        from training.card import write_card

        (ckpt / "eval.md").write_text(table + "\n")
        write_card(ckpt)
    return table


def fd_scores(visual, r: dict, real_feats: np.ndarray, s: EvalSettings) -> tuple[float, float, list[float]]:
    """The Fréchet distance over all pictures, its standard error over stories, and per bin of segments."""
    feats = image_features(visual, r["pictures"])
    real = real_feats[[i * s.segments + k for i, k in r["keys"]]]  # the real picture at each generated key
    by_bin = []
    for lo in range(0, s.segments, FD_BIN):
        rows = [n for n, (_, k) in enumerate(r["keys"]) if lo <= k < lo + FD_BIN]
        by_bin.append(frechet(feats[rows], real[rows]) if len(rows) > 2 else float("nan"))
    return frechet(feats, real), fd_standard_error(feats, real, [i for i, _ in r["keys"]], s.seed), by_bin


def fd_standard_error(feats: np.ndarray, real: np.ndarray, story_of: list[int], seed: int) -> float:
    """Bootstrap over whole stories (a story's pictures are not independent of each other)."""
    rows: dict[int, list[int]] = {}
    for n, i in enumerate(story_of):
        rows.setdefault(i, []).append(n)
    stories = list(rows)
    rng = np.random.default_rng(seed)
    draws = []
    for _ in range(FD_RESAMPLES):
        pick = np.concatenate([rows[stories[j]] for j in rng.integers(0, len(stories), len(stories))])
        draws.append(frechet(feats[pick], real[pick]))
    return float(np.std(draws, ddof=1))


def story_means(r: dict) -> dict[str, list[float]]:
    """Each check averaged over each story's segments: the unit the standard errors count."""
    return {name: [float(np.mean(v[name])) if v[name] else 0.0 for v in r["per_story"].values()] for name in CHECKS}


def standard_error(values: list[float]) -> float:
    return float(np.std(values, ddof=1) / np.sqrt(len(values))) if len(values) > 1 else float("nan")


def summarise(r: dict, s: EvalSettings) -> dict:
    per = {name: [float(np.mean(r["per_segment"][k][name])) if r["per_segment"][k][name] else 0.0
                  for k in range(s.segments)] for name in CHECKS}
    total = {name: float(np.mean([v for k in range(s.segments) for v in r["per_segment"][k][name]] or [0.0]))
             for name in CHECKS}
    by_story = story_means(r)
    se = {name: standard_error(by_story[name]) for name in CHECKS} | {"fd": r["fd_se"]}
    return {"mode": r["mode"], "sink": r["sink"], "per_segment": per, "per_story": by_story, "fd_by_bin": r["fd_by_bin"],
            "summary": {**total, "fd": r["fd"], "se": se, "mllm_seconds": round(r["seconds"], 1),
                        "render_seconds": round(r["render_seconds"], 1), "output_tokens": r["tokens"],
                        "peak_kv_mib": round(r["peak_kv_bytes"] / 2**20, 2), "complete_stories": r["complete"]}}


def write_outputs(out: Path, results: list[dict], s: EvalSettings, source: str = "") -> str:
    (out / "results.json").write_text(json.dumps({"settings": asdict(s), "heldout": source, "modes": results},
                                                 indent=2) + "\n")
    table = format_table(results, s, source)
    (out / "table.md").write_text(table + "\n")
    plot(results, s, out / "metrics.png")
    return table


def heldout_source(folder: Path) -> str:
    """How the held-out stories were made, from the provenance ``seedstory data storyworld`` writes."""
    path = folder / "storyworld.json"
    if not path.is_file():
        return f"held-out stories from {folder}"
    world = json.loads(path.read_text())
    return f"held-out StoryWorld stories, data seed {world['seed']}: `{world['command']}`"


def format_table(results: list[dict], s: EvalSettings, source: str = "") -> str:
    head = (f"{s.stories} held-out openings x {s.segments} segments, {s.steps} denoising steps at guidance "
            f"{s.guidance:g}; quality metrics averaged over all segments, ± one standard error over stories\n\n"
            "| attention | FD (visual features) ↓ | caption validity ↑ | hero consistency ↑ | place agreement ↑ "
            "| MLLM time (s) | render time (s) | peak KV (MiB) |\n| --- | --- | --- | --- | --- | --- | --- | --- |")
    rows = [f"| {r['mode']} | {m['fd']:.2f} ± {e['fd']:.2f} | {m['valid']:.3f} | {m['hero']:.3f} ± {e['hero']:.3f} "
            f"| {m['place']:.3f} ± {e['place']:.3f} | {m['mllm_seconds']:.1f} | {m['render_seconds']:.1f} "
            f"| {m['peak_kv_mib']:.1f} |" for r in results for m in [r["summary"]] for e in [m["se"]]]
    intro = [f"Data: {source}.", ""] if source else []
    return "\n".join([*intro, head, *rows, "", sink_line(results[-1]["sink"]), *paired_table(results)])


def sink_line(sink: dict) -> str:
    """The settings every mode ran with (the modes use the parts that apply to them)."""
    marks = "/".join(str(sink[k]) for k in NEIGHBOURHOODS)
    return (f"Sink settings: {sink['sink_tokens']} sink tokens, `<img>`/`</img>` neighbourhoods {marks} "
            f"(before/after `<img>`, before/after `</img>`), a window of {sink['window_segments']} segments.")


def paired_table(results: list[dict]) -> list[str]:
    """Each mode minus dense and minus window, story by story: the same openings and seeds in every
    mode make these differences far less noisy than the standard errors of the means above."""
    by_mode = {r["mode"]: r["per_story"] for r in results}
    bases = [b for b in ("dense", "window") if b in by_mode]
    others = [m for m in by_mode if m not in bases[:1]]
    if not bases or len(by_mode) < 2:
        return []
    cols = [(name, b) for name in ("hero", "place") for b in bases]
    lines = ["", "Story-paired differences (mean ± standard error over stories):", "",
             "| attention | " + " | ".join(f"{name} − {b}" for name, b in cols) + " |",
             "| --- |" + " --- |" * len(cols)]
    for mode in others:
        cells = []
        for name, b in cols:
            d = np.subtract(by_mode[mode][name], by_mode[b][name])
            cells.append("" if mode == b else f"{d.mean():+.3f} ± {standard_error(list(d)):.3f}")
        lines.append(f"| {mode} | " + " | ".join(cells) + " |")
    return lines


def plot(results: list[dict], s: EvalSettings, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(18, 4))
    x = np.arange(1, s.segments + 1)
    for ax, (name, title) in zip(axes, [("valid", "caption validity"), ("hero", "hero consistency"),
                                        ("place", "place agreement")]):
        for r in results:
            ax.plot(x, r["per_segment"][name], label=r["mode"], marker=".")
        ax.set(title=title, xlabel="segment", ylim=(-0.02, 1.02))
        ax.axvline(10.5, color="grey", ls=":", lw=1)  # the training window's length
    bins = np.arange(len(results[0]["fd_by_bin"])) * FD_BIN + (FD_BIN + 1) / 2
    for r in results:
        axes[3].plot(bins, r["fd_by_bin"], label=r["mode"], marker="o")
    axes[3].set(title=f"Fréchet distance ({FD_BIN}-segment bins) ↓", xlabel="segment")
    axes[3].axvline(10.5, color="grey", ls=":", lw=1)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


# -- the command: `seedstory eval` (cluster/cli.py adds --config and the sink flags) -----------------

def add_command(commands) -> argparse.ArgumentParser:
    """``seedstory eval``'s own options, registered on the ``seedstory`` parser's subcommands.
    Their defaults live in EvalSettings (None: not given), so the parser needs none of the eval's imports."""
    e = commands.add_parser("eval", help="long stories under each sink mode: the paper's Table 2 on StoryWorld")
    e.add_argument("--ckpt", help="checkpoint folder (default: the config's)")
    e.add_argument("--heldout", required=True,
                   help="a StoryWorld folder the model never saw (seedstory data storyworld)")
    e.add_argument("--out", required=True, help="folder for table.md, results.json and the plot")
    e.add_argument("--stories", type=int)
    e.add_argument("--segments", type=int)
    e.add_argument("--modes", help="comma-separated, among dense,window,streaming,multimodal (default: all)")
    e.add_argument("--steps", type=int, help="denoising steps per picture")
    e.add_argument("--guidance", type=float, help="classifier-free guidance of the renders")
    e.add_argument("--seed", type=int)
    e.add_argument("--card", action="store_true", help="also write the table into the checkpoint's model card")
    return e


def eval_settings(a: argparse.Namespace, sink: SinkSettings = SinkSettings()) -> EvalSettings:
    """The eval's settings: what the command line gives, else EvalSettings' own defaults (one place)."""
    given = {k: getattr(a, k) for k in ("stories", "segments", "steps", "guidance", "seed")
             if getattr(a, k) is not None}
    if a.modes is not None:
        given["modes"] = tuple(a.modes.split(","))
    return EvalSettings(sink=sink, **given)


def run_command(a: argparse.Namespace, ckpt: Path, sink: SinkSettings) -> None:
    print(run_eval(ckpt, Path(a.heldout), Path(a.out), eval_settings(a, sink), card=a.card))
