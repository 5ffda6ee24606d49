"""The eval's numbers and what it writes: the Fréchet distance and its bootstrap, per-mode
summaries with standard errors over stories, the story-paired differences between modes, the
Markdown table (the shape of the paper's Table 2) with the ceilings from ground-truth features,
the per-segment plot, and the files ``results.json``, ``table.md``, ``metrics.png`` and ``stories.jsonl``."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import numpy as np

from actors.mllm.sink import NEIGHBOURHOODS
from training.evaluation.judge import OPTIONAL
from training.evaluation.settings import EvalSettings

FD_BIN = 5  # segments per bin of the per-segment Fréchet distance (50 pictures per index is too few)
FD_RESAMPLES = 200  # story bootstrap for the Fréchet distance's standard error
PAIRED = ("hero", "place", "look", "returning")  # what the story-paired differences compare
TITLES = {
    "valid": "caption validity",
    "hero": "hero consistency",
    "place": "place agreement",
    "look": "look fidelity",
    "returning": "returning fidelity",
}


# -- statistics ----------------------------------------------------------------------------------


def frechet(first: np.ndarray, second: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to feature sets ``first`` (N, d) and ``second`` (M, d)."""
    mean1, mean2 = first.mean(0), second.mean(0)
    cov1, cov2 = np.cov(first, rowvar=False), np.cov(second, rowvar=False)
    root1 = _sqrt_psd(cov1)
    cross = np.linalg.eigvalsh(root1 @ cov2 @ root1).clip(min=0)  # tr sqrt(C1 C2) = tr sqrt(C1^½ C2 C1^½)
    return float(((mean1 - mean2) ** 2).sum() + np.trace(cov1) + np.trace(cov2) - 2 * np.sqrt(cross).sum())


def _sqrt_psd(cov: np.ndarray) -> np.ndarray:
    """The symmetric square root of a positive semi-definite matrix (rounding's negative
    eigenvalues taken as 0)."""
    eigenvalues, eigenvectors = np.linalg.eigh(cov)
    return (eigenvectors * np.sqrt(eigenvalues.clip(min=0))) @ eigenvectors.T


def fd_standard_error(feats: np.ndarray, real: np.ndarray, story_of: list[int], seed: int) -> float:
    """Bootstrap over whole stories (a story's pictures are not independent of each other)."""
    rows: dict[int, list[int]] = {}
    for row, story in enumerate(story_of):
        rows.setdefault(story, []).append(row)
    stories = list(rows)
    rng = np.random.default_rng(seed)
    draws = []
    for _ in range(FD_RESAMPLES):
        pick = np.concatenate([rows[stories[drawn]] for drawn in rng.integers(0, len(stories), len(stories))])
        draws.append(frechet(feats[pick], real[pick]))
    return float(np.std(draws, ddof=1))


def _mean(values: list[float], name: str) -> float | None:
    """The mean of one check's values; with none, 0.0 (a segment or story not written fails), but
    None for an OPTIONAL check (no character came back: nothing to judge)."""
    return float(np.mean(values)) if values else (None if name in OPTIONAL else 0.0)


def story_means(outcome: dict) -> dict[str, list[float | None]]:
    """Each check averaged over each story's segments: the unit the standard errors count."""
    names = next(iter(outcome["per_story"].values()))
    return {
        name: [_mean(verdicts[name], name) for verdicts in outcome["per_story"].values()] for name in names
    }


def standard_error(values: list[float]) -> float:
    """The standard error of the mean of ``values`` (NaN for fewer than two)."""
    return float(np.std(values, ddof=1) / np.sqrt(len(values))) if len(values) > 1 else float("nan")


def summarise(outcome: dict, settings: EvalSettings) -> dict:
    """One mode's result for the table and results.json, from ``run.evaluate_mode``'s outcome (with
    its Fréchet scores): each check per segment, per story and overall with its standard error,
    plus the time, tokens and KV the mode took."""
    names = list(next(iter(outcome["per_story"].values())))
    per_segment = {
        name: [_mean(outcome["per_segment"][index][name], name) for index in range(settings.segments)]
        for name in names
    }
    by_story = story_means(outcome)
    # Every segment counts alike, as every story has as many; but a story's returns are its own
    # unit (stories have few and unequal numbers of them): their mean is over the stories with one.
    total = {
        name: float(
            np.mean(
                [value for index in range(settings.segments) for value in outcome["per_segment"][index][name]]
                or [0.0]
            )
        )
        for name in names
        if name not in OPTIONAL
    }
    kept = {name: [value for value in by_story[name] if value is not None] for name in names}
    total |= {name: float(np.mean(kept[name])) if kept[name] else None for name in names if name in OPTIONAL}
    errors = {name: standard_error(kept[name]) for name in names} | {"fd": outcome["fd_se"]}
    extra = {}
    if "returning" in names:
        extra = {
            "returns": sum(len(verdicts["returning"]) for verdicts in outcome["per_story"].values()),
            "stories_with_returns": len(kept["returning"]),
        }
    return {
        "mode": outcome["mode"],
        "sink": outcome["sink"],
        "per_segment": per_segment,
        "per_story": by_story,
        "fd_by_bin": outcome["fd_by_bin"],
        "summary": {
            **total,
            **extra,
            "fd": outcome["fd"],
            "se": errors,
            "mllm_seconds": round(outcome["seconds"], 1),
            "render_seconds": round(outcome["render_seconds"], 1),
            "output_tokens": outcome["tokens"],
            "peak_kv_mib": round(outcome["peak_kv_bytes"] / 2**20, 2),
            "complete_stories": outcome["complete"],
        },
    }


def paired(first: list[float | None], second: list[float | None]) -> np.ndarray:
    """Story by story ``first`` − ``second``, over the stories with a value in both (a story without
    a return has none for "returning"; the other checks always have one)."""
    return np.array(
        [one - other for one, other in zip(first, second) if one is not None and other is not None],
        dtype=float,
    )


# -- the files ------------------------------------------------------------------------------------


def write_outputs(
    out: Path,
    results: list[dict],
    settings: EvalSettings,
    source: str = "",
    world: str = "classic",
    ceiling: dict | None = None,
    window: int | None = None,
) -> str:
    """results.json, table.md and metrics.png in ``out``; returns the table."""
    (out / "results.json").write_text(
        json.dumps(
            {
                "settings": asdict(settings),
                "heldout": source,
                "world": world,
                "training_window": window,
                "modes": results,
                "ceiling": ceiling,
            },
            indent=2,
        )
        + "\n"
    )
    table = format_table(results, settings, source, ceiling)
    (out / "table.md").write_text(table + "\n")
    plot(results, settings, out / "metrics.png", window)
    return table


def write_captions(path: Path, captions: dict[str, dict[int, dict]]) -> None:
    """Every caption each mode wrote, one line per (mode, story), each marked valid or not: what
    a reader needs to see why a mode's caption validity falls."""
    with path.open("w") as stream:
        for mode, stories in captions.items():
            for story, record in sorted(stories.items()):
                stream.write(json.dumps({"mode": mode, "story": story, **record}) + "\n")


# -- the Markdown table ----------------------------------------------------------------------------


def format_table(
    results: list[dict], settings: EvalSettings, source: str = "", ceiling: dict | None = None
) -> str:
    """The table of every mode's metrics (the paper's Table 2), then the sink settings, the
    story-paired differences and the ceilings (de-tokenizer and the tokenizer's own decoder)."""
    cast_columns = "look" in results[0]["per_story"]  # the returning world's columns
    captions = (
        "every caption given (the held-out story's own), the pictures drawn by the model"
        if settings.captions == "given"
        else "the captions after the opening written by the model"
    )
    head = (
        f"{settings.stories} held-out openings x {settings.segments} segments ({captions}), {settings.steps} "
        f"{settings.sampler} steps at guidance {settings.guidance:g} (on the first "
        f"{settings.guidance_until:g} of them); quality metrics averaged over all segments, ± one "
        "standard error over stories\n\n"
        "| attention | FD (visual features) ↓ | caption validity ↑ | hero consistency ↑ | place agreement ↑ "
        + ("| look fidelity ↑ | returning fidelity ↑ (returns) " if cast_columns else "")
        + "| MLLM time (s) | render time (s) | peak KV (MiB) |\n| --- | --- | --- | --- | --- | "
        + ("--- | --- | " if cast_columns else "")
        + "--- | --- | --- |"
    )
    rows = [
        f"| {result['mode']} | {summary['fd']:.2f} ± {errors['fd']:.2f} | {summary['valid']:.3f} "
        f"| {summary['hero']:.3f} ± {errors['hero']:.3f} "
        f"| {summary['place']:.3f} ± {errors['place']:.3f} | "
        + (cast_cells(summary) if cast_columns else "")
        + f"{summary['mllm_seconds']:.1f} | {summary['render_seconds']:.1f} "
        f"| {summary['peak_kv_mib']:.1f} |"
        for result in results
        for summary in [result["summary"]]
        for errors in [summary["se"]]
    ]
    intro = [f"Data: {source}.", ""] if source else []
    notes = ["", cast_note(settings)] if cast_columns else []
    return "\n".join(
        [
            *intro,
            head,
            *rows,
            *notes,
            "",
            sink_line(results[-1]["sink"]),
            *paired_table(results),
            *ceiling_table(ceiling),
        ]
    )


def cast_cells(summary: dict) -> str:
    """The returning world's two cells of a mode's row: look and returning fidelity."""
    errors = summary["se"]
    returning = (
        "–" if summary["returning"] is None else f"{summary['returning']:.3f} ± {errors['returning']:.3f}"
    )
    return (
        f"{summary['look']:.3f} ± {errors['look']:.3f} | {returning} "
        f"({summary['returns']} in {summary['stories_with_returns']} stories) | "
    )


def cast_note(settings: EvalSettings) -> str:
    """What the returning world's columns measure, under its table."""
    return (
        "Hero consistency: the hero named first and drawn with its own look. Look fidelity: the characters "
        "a caption names, drawn with their own looks (colour, shape and pattern each nearest among the "
        "world's, the caption's scene fixed). Returning fidelity: a character a caption names after "
        f"{settings.sink.window_segments} or more segments away (the sink's window; the opening counts as "
        "everyone there), drawn with its own look; per story the mean over its returns, averaged over the "
        "stories with one."
    )


def sink_line(sink: dict) -> str:
    """The settings every mode ran with (the modes use the parts that apply to them)."""
    marks = "/".join(str(sink[key]) for key in NEIGHBOURHOODS)
    opening = sink["sink_segments"]
    whole = f" and the first {opening} segment{'s' * (opening > 1)} whole" if opening else ""
    return (
        f"Sink settings: {sink['sink_tokens']} sink tokens{whole}, `<img>`/`</img>` neighbourhoods {marks} "
        f"(before/after `<img>`, before/after `</img>`), a window of {sink['window_segments']} segments."
    )


def paired_table(results: list[dict]) -> list[str]:
    """Each mode minus dense and minus window, story by story: the same openings and seeds in every
    mode make these differences far less noisy than the standard errors of the means above."""
    by_mode = {result["mode"]: result["per_story"] for result in results}
    bases = [base for base in ("dense", "window") if base in by_mode]
    others = [mode for mode in by_mode if mode not in bases[:1]]
    if not bases or len(by_mode) < 2:
        return []
    names = [name for name in PAIRED if name in results[0]["per_story"]]
    columns = [(name, base) for name in names for base in bases]
    lines = [
        "",
        "Story-paired differences (mean ± standard error over stories):",
        "",
        "| attention | " + " | ".join(f"{name} − {base}" for name, base in columns) + " |",
        "| --- |" + " --- |" * len(columns),
    ]
    for mode in others:
        cells = []
        for name, base in columns:
            differences = paired(by_mode[mode][name], by_mode[base][name])
            count = f" ({len(differences)} stories)" if name in OPTIONAL else ""
            cells.append(
                ""
                if mode == base
                else "no story paired"
                if not len(differences)
                else f"{differences.mean():+.3f} ± {standard_error(list(differences)):.3f}{count}"
            )
        lines.append(f"| {mode} | " + " | ".join(cells) + " |")
    if any(name in OPTIONAL for name in names):
        lines += [
            "",
            "Returning differences pair only the stories with a return in both modes (their count in "
            "brackets).",
        ]
    return lines


def ceiling_table(ceiling: dict | None) -> list[str]:
    """The ceilings from ground-truth features, per character and role: what the real pictures'
    features render to through the de-tokenizer, then what the visual tokenizer's own decoder
    draws from them (``ceiling["decoder"]``; absent from results written before features)."""
    if not ceiling:
        return []
    judge_by = (
        "the classic judge, the nearest of every character drawn as the hero"
        if ceiling["world"] == "classic"
        else "the look judge, every character there"
    )
    lines = [
        "",
        f"De-tokenizer ceiling: the {ceiling['pictures']} real pictures of these stories and segments, "
        f"made features by the visual tokenizer and rendered at the same steps, guidance and seeds, judged "
        f"against their ground truth by {judge_by} (fraction right, count):",
        *_tally_rows(ceiling, ceiling["world"]),
    ]
    if ceiling.get("decoder"):
        lines += [
            "",
            "Visual tokenizer's own decoder from the same features (`decode(encode(x))`, the auxiliary "
            "pixel decoder: what the features carry, whatever the de-tokenizer makes of them), judged "
            "alike:",
            *_tally_rows(ceiling["decoder"], ceiling["world"]),
        ]
    return lines


def _tally_rows(tallied: dict, world: str) -> list[str]:
    """One ``judge.tally`` as a Markdown table: a column per character and role, a row per verdict."""
    names, roles = list(tallied["per_character"]), list(tallied["per_role"])
    rows = [
        ("right", "hero drawn right" if world == "classic" else "look (all three)"),
        *((attribute, attribute) for attribute in tallied["per_attribute"]),
    ]
    lines = [
        "",
        "| | " + " | ".join([*names, *roles]) + " | all | min over characters |",
        "| --- |" + " --- |" * (len(names) + len(roles) + 2),
    ]
    for key, label in rows:
        cells = [
            f"{group[key]:.2f} ({group['n']})"
            for group in [
                *(tallied["per_character"][name] for name in names),
                *(tallied["per_role"][role] for role in roles),
            ]
        ]
        total = tallied["mean"] if key == "right" else tallied["per_attribute"][key]
        low = min(tallied["per_character"][name][key] for name in names)
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {total:.3f} | {low:.2f} |")
    return lines


# -- the plot ------------------------------------------------------------------------------------


def plot(results: list[dict], settings: EvalSettings, path: Path, window: int | None = None) -> None:
    """Each check against the segment index, per mode, then the binned Fréchet distance. ``window``:
    the training windows' length, marked where the model starts writing past what it was trained on."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results[0]["per_segment"])
    fig, axes = plt.subplots(1, len(names) + 1, figsize=(4.5 * (len(names) + 1), 4))
    segment_numbers = np.arange(1, settings.segments + 1)
    for ax, name in zip(axes, names):
        for result in results:
            values = [
                np.nan if value is None else value for value in result["per_segment"][name]
            ]  # no return there
            ax.plot(segment_numbers, values, label=result["mode"], marker=".")
        ax.set(title=TITLES[name], xlabel="segment", xlim=(0.5, settings.segments + 0.5), ylim=(-0.02, 1.02))
    bin_centres = np.arange(len(results[0]["fd_by_bin"])) * FD_BIN + (FD_BIN + 1) / 2
    for result in results:
        axes[-1].plot(bin_centres, result["fd_by_bin"], label=result["mode"], marker="o")
    axes[-1].set(title=f"Fréchet distance ({FD_BIN}-segment bins) ↓", xlabel="segment")
    if window is not None:
        for ax in axes:
            ax.axvline(window + 0.5, color="grey", ls=":", lw=1)  # past it, longer than any training window
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
