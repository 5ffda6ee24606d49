"""StoryWorld's pictures, drawn with PIL from the ground truth: the background of the place,
every character there with its look, the hero posed by the action. ``draw_segment`` is both how
``training/storyworld_writer.py`` draws a world's pictures and the ground-truth renderer that
evaluation judges generated pictures against.
"""

from __future__ import annotations

import math

from PIL import Image, ImageChops, ImageDraw

from training.storyworld import ACTIONS, CHARACTERS, PLACE_BY_NAME, Character, Segment

STRIPE = (25, 25, 25)  # far from every sky, ground and palette colour: it reads as stripes, nothing else


def _shape_points(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    if shape == "triangle":
        return [(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    if shape == "diamond":
        return [(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)]
    if shape == "pentagon":
        return [
            (cx + r * math.sin(2 * math.pi * k / 5), cy - r * math.cos(2 * math.pi * k / 5)) for k in range(5)
        ]
    if shape == "cross":
        arm = r / 3  # half the width of an arm
        return [
            (cx - arm, cy - r),
            (cx + arm, cy - r),
            (cx + arm, cy - arm),
            (cx + r, cy - arm),
            (cx + r, cy + arm),
            (cx + arm, cy + arm),
            (cx + arm, cy + r),
            (cx - arm, cy + r),
            (cx - arm, cy + arm),
            (cx - r, cy + arm),
            (cx - r, cy - arm),
            (cx - arm, cy - arm),
        ]
    raise ValueError(shape)


def _fill_shape(
    draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, fill, outline=None
) -> None:
    box = (cx - r, cy - r, cx + r, cy + r)
    if shape == "circle":
        draw.ellipse(box, fill=fill, outline=outline)
    elif shape == "square":
        draw.rectangle(box, fill=fill, outline=outline)
    else:
        draw.polygon(_shape_points(shape, cx, cy, r), fill=fill, outline=outline)


def _stripe(img: Image.Image, shape: str, cx: float, cy: float, r: float) -> None:
    """Dark bands across the shape's inside, two or three whatever its size: bands of 3 px and
    more keep both the stripes and the colour between them on a friend at 64 px after JPEG."""
    inside, bands = Image.new("L", img.size), Image.new("L", img.size)
    _fill_shape(ImageDraw.Draw(inside), shape, cx, cy, r, 255)
    band, draw = max(2, round(r / 2.5)), ImageDraw.Draw(bands)
    for y in range(int(cy - r) + band, math.ceil(cy + r), 2 * band):
        draw.rectangle((0, y, img.width, y + band - 1), fill=255)
    img.paste(STRIPE, mask=ImageChops.multiply(inside, bands))


def draw_character(img: Image.Image, ch: Character, cx: float, cy: float, r: float) -> None:
    _fill_shape(ImageDraw.Draw(img), ch.shape, cx, cy, r, ch.colour, (0, 0, 0))
    if ch.pattern == "striped":
        _stripe(img, ch.shape, cx, cy, r)


def layout(seg: Segment, size: int) -> dict[str, tuple[float, float, float]]:
    """Where each character of a segment stands: name -> (centre x, centre y, radius). The hero
    is posed by the action; friends stand in a column on the other side, smaller, spaced so that
    three do not overlap (classic stories have at most one)."""
    _, _, (fx, fy), scale = ACTIONS[seg.action]
    spots = {seg.hero: (fx * size, fy * size, 0.16 * size * scale)}
    ox = 0.2 if fx > 0.5 else 0.8
    for k, other in enumerate(seg.others):
        spots[other] = (ox * size, 0.72 * size - k * 0.21 * size, 0.1 * size)
    return spots


def draw_segment(seg: Segment, size: int = 128, cast: tuple[Character, ...] = CHARACTERS) -> Image.Image:
    """The ground-truth picture of a segment: background of the place, every character there
    with its look in ``cast`` (the classic characters by default), the hero posed by the action."""
    place = PLACE_BY_NAME[seg.place]
    img = Image.new("RGB", (size, size), place.sky)
    ImageDraw.Draw(img).rectangle((0, int(size * 0.6), size, size), fill=place.ground)
    looks = {c.name: c for c in cast}
    for name, (cx, cy, r) in layout(seg, size).items():
        draw_character(img, looks[name], cx, cy, r)
    return img
