"""``seedstory generate``: one story from a running service, with progress, written to a folder."""

from __future__ import annotations

from pathlib import Path

from tqdm import tqdm

from cluster.client import Story, StoryClient, build_request, write_story


def generate_story(target: str, prompt: str, segments: int, out: Path, image: Path | None = None,
                   token: str | None = None, seed: int | None = None, steps: int = 0,
                   temperature: float = 0.8, source: str = "") -> Path:
    request = build_request(prompt, segments, image.read_bytes() if image else None, seed=seed,
                            render_seed=seed, steps=steps, temperature=temperature)
    story = Story()
    with StoryClient(target, token) as client, tqdm(total=2 * request.segments, unit="event",
                                                     desc="story") as bar:
        for ev in client.stream(request):
            story.add(ev)
            kind = ev.WhichOneof("event")
            if kind in ("caption", "image"):  # an error's status comes after an event with the story id only
                bar.set_description(f"segment {getattr(ev, kind).index + 1}/{request.segments}: {kind}")
                bar.update()
    page = write_story(out, story, source)
    s = story.stats
    print(f"{len(story.segments)} segments in {s.get('total_s', 0):.1f}s "
          f"(MLLM {s.get('mllm_s', 0):.1f}s, {s.get('tokens_per_s', 0):.0f} tok/s; render {s.get('render_s', 0):.1f}s; "
          f"peak KV blocks {s.get('peak_kv_blocks', 0)})")
    return page
