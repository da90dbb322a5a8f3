"""ShapesWorld: procedurally generated scenes of coloured shapes on a 3×3 grid, with exact ground truth.

A scene is a pure function of ``(split, seed, index)``: :func:`sample_scene` draws the layout and ground truth
(no pixels), :func:`render_scene` paints it. Everything is drawn 4× supersampled and box-reduced, so edges are
antialiased and small objects stay distinguishable at the default 128 px.

Splits are disjoint by construction in two ways: each split has its own seed stream, and the background colour
of every image encodes its split (the channel sum modulo 3), so no image of one split can equal an image of
another. Bounding boxes are ``(x1, y1, x2, y2)`` integer pixels, ``x1, y1`` inclusive and ``x2, y2``
exclusive (the box of pixel columns ``x1 .. x2-1``), in the coordinates of the rendered image.

A :class:`Variant` changes only the geometry: ``highres`` draws the same layouts (objects, cells, word) on a
384-px canvas with objects half as large and words a third of the default size, so a single low-resolution
view can't read them while tiles at native resolution can (docs/high-resolution.md).
"""

from __future__ import annotations

import functools
import io
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from vlmkit.errors import ConfigError

SHAPES = ("circle", "square", "triangle", "star", "diamond", "hexagon")
SHAPE_PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles", "star": "stars",
                 "diamond": "diamonds", "hexagon": "hexagons"}  # fmt: skip
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (214, 39, 40),
    "orange": (247, 129, 20),
    "yellow": (232, 196, 0),
    "green": (44, 160, 44),
    "blue": (31, 90, 220),
    "purple": (128, 60, 180),
    "pink": (240, 120, 190),
    "brown": (133, 80, 38),
    "gray": (127, 127, 127),
    "black": (20, 20, 20),
}
SIZES = ("small", "large")
CELLS = ("top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right")
WORDS = (
    "cat", "dog", "sun", "cup", "hat", "key", "pen", "owl", "bee", "fox",
    "tree", "fish", "bird", "moon", "boat", "lamp", "door", "book", "frog", "kite",
    "apple", "house", "river", "cloud", "plant", "chair", "table", "horse", "tiger", "zebra",
    "garden", "rocket", "pencil", "window", "bottle", "candle", "turtle", "rabbit", "monkey", "planet",
    "penguin", "dolphin", "lantern", "blanket", "elephant", "mountain", "umbrella", "dinosaur",
)  # fmt: skip
"""The fixed list of words (3 to 8 lowercase letters) a scene may show; none is a colour or shape name."""

SPLITS = {"train": 1, "val": 2, "test": 3}
"""Split name → stream id. The id starts every seed sequence, and ``id % 3`` is the background's channel sum
modulo 3, so the splits never share a seed stream or an image."""

DEFAULT_IMAGE_SIZE = 128
MIN_OBJECTS, MAX_OBJECTS = 1, 6
WORD_PROBABILITY = 0.6
SUPERSAMPLE = 4

# Sampling weights: deliberately uneven, so some colour/shape combinations are more common than others and the
# POPE "popular" negatives mean something.
SHAPE_WEIGHTS = (0.24, 0.20, 0.17, 0.15, 0.13, 0.11)
COLOUR_WEIGHTS = (0.16, 0.055, 0.11, 0.13, 0.14, 0.08, 0.065, 0.055, 0.07, 0.135)
REUSE_SHAPE, REUSE_COLOUR = 0.3, 0.2
SIZE_FRACTION = {"small": (0.45, 0.55), "large": (0.80, 0.90)}
"""Object extent as a fraction of the cell side, drawn uniformly from this range."""

POPULARITY_REFERENCE = ("train", 0, 2000)
"""(split, seed, count): the reference sample of scenes whose object counts rank the colour/shape combinations."""

# Unit outlines, centred, extent within [-1, 1]; literal decimals so geometry is exact on every machine.
_OUTLINES: dict[str, tuple[tuple[float, float], ...]] = {
    "square": ((-0.85, -0.85), (0.85, -0.85), (0.85, 0.85), (-0.85, 0.85)),
    "triangle": ((0.0, -0.866), (1.0, 0.866), (-1.0, 0.866)),
    "diamond": ((0.0, -1.0), (0.7, 0.0), (0.0, 1.0), (-0.7, 0.0)),
    "hexagon": ((1.0, 0.0), (0.5, 0.866), (-0.5, 0.866), (-1.0, 0.0), (-0.5, -0.866), (0.5, -0.866)),
    "star": ((0.0, -0.9045), (0.2469, -0.2443), (0.9511, -0.2135), (0.3994, 0.2253), (0.5878, 0.9045),
             (0.0, 0.5155), (-0.5878, 0.9045), (-0.3994, 0.2253), (-0.9511, -0.2135), (-0.2469, -0.2443)),
}  # fmt: skip
_CIRCLE_RADIUS = 0.95
_CELL_MARGIN = 6  # supersampled pixels kept free at each cell edge
_WORD_FONT_SIZES = (16, 15, 14, 13, 12, 11, 10, 9)

Box = tuple[int, int, int, int]


@dataclass(frozen=True)
class Variant:
    """A family of ShapesWorld scenes: same layouts, different geometry (canvas, object and word sizes)."""

    name: str
    image_size: int
    """The default canvas side (``--image-size`` overrides it)."""
    min_image_size: int
    word_scale: float
    """The word is drawn as the default world draws it in a cell this many times the size, centred in its cell
    (font, fit and jitter all scaled)."""
    size_fraction: dict[str, tuple[float, float]]
    """Object extent as a fraction of the cell side, per size."""


VARIANTS = {
    "default": Variant("default", DEFAULT_IMAGE_SIZE, 64, 1.0, SIZE_FRACTION),
    "highres": Variant("highres", 384, 256, 1 / 3, {"small": (0.225, 0.275), "large": (0.40, 0.45)}),
}
"""``default``: the 128-px world. ``highres``: a 384-px canvas, objects half as large, and each word in the
middle third of its cell, so it has the pixels a default word has at 128 px (a 9-16-px font), about 3 px tall
once the canvas is shrunk to 96 px, while each tile of a 3×3 cut is one cell with its word as a 96-px tower sees
a default cell's."""


def get_variant(name: str) -> Variant:
    """The variant called ``name``; raises ConfigError for an unknown one."""
    if name not in VARIANTS:
        raise ConfigError(f"unknown ShapesWorld variant {name!r}; expected one of {', '.join(VARIANTS)}")
    return VARIANTS[name]


@dataclass(frozen=True)
class ShapeObject:
    """One object: its attributes, its geometry (supersampled pixels) and its pixel bounding box."""

    shape: str
    colour: str
    size: str
    cell: str
    bbox: Box
    center: tuple[int, int]
    radius: int

    @property
    def name(self) -> str:
        """``"red circle"``: colour and shape, unique within a scene."""
        return f"{self.colour} {self.shape}"

    @property
    def description(self) -> str:
        """``"large red circle"``."""
        return f"{self.size} {self.colour} {self.shape}"


@dataclass(frozen=True)
class WordLabel:
    """The word printed in a free cell, its font size (supersampled) and its pixel bounding box."""

    text: str
    cell: str
    bbox: Box
    anchor: tuple[int, int]
    font_size: int


@dataclass(frozen=True)
class Scene:
    """The ground truth of one ShapesWorld image. Objects are in grid (reading) order."""

    split: str
    seed: int
    index: int
    image_size: int
    background: tuple[int, int, int]
    objects: tuple[ShapeObject, ...]
    word: WordLabel | None
    variant: str = "default"

    @property
    def id(self) -> str:
        """Stable sample id, e.g. ``train-s0-0000042``."""
        return scene_id(self.split, self.seed, self.index)

    def object_at(self, cell: str) -> ShapeObject | None:
        """The object in ``cell``, or None."""
        return next((obj for obj in self.objects if obj.cell == cell), None)

    def find(self, colour: str, shape: str) -> ShapeObject | None:
        """The object with this colour and shape (unique within a scene), or None."""
        return next((obj for obj in self.objects if obj.colour == colour and obj.shape == shape), None)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready ground truth: objects with shape, colour, size, cell and bbox; the word and its box.

        ``variant`` is written only when it isn't ``default`` (so default data stays as it always was).
        """
        variant = {} if self.variant == "default" else {"variant": self.variant}
        return {
            "id": self.id,
            "split": self.split,
            "seed": self.seed,
            "index": self.index,
            "image_size": self.image_size,
            **variant,
            "objects": [
                {"shape": o.shape, "colour": o.colour, "size": o.size, "cell": o.cell, "bbox": list(o.bbox)}
                for o in self.objects
            ],
            "word": None if self.word is None else {"text": self.word.text, "cell": self.word.cell,
                                                    "bbox": list(self.word.bbox)},
        }  # fmt: skip


def scene_id(split: str, seed: int, index: int) -> str:
    """The id of scene ``index`` of ``split`` under ``seed``."""
    return f"{split}-s{seed}-{index:07d}"


def check_split(split: str) -> int:
    """The stream id of ``split``; raises ConfigError for an unknown split."""
    if split not in SPLITS:
        raise ConfigError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    return SPLITS[split]


def stream_rng(split: str, seed: int, index: int, stream: int) -> np.random.Generator:
    """The random generator of one purpose (``stream`` ≥ 1) for one sample; independent across all four."""
    code = check_split(split)
    for name, value in (("seed", seed), ("index", index)):
        if not 0 <= value < 2**32:
            raise ConfigError(f"{name} must be in [0, 2**32), got {value}")
    return np.random.default_rng([code, seed, index, stream])


def cell_bounds(cell: int, image_size: int, scale: int = 1) -> Box:
    """``(x0, y0, x1, y1)`` of grid cell ``cell`` (0..8, reading order), in pixels times ``scale``."""
    side = image_size * scale
    row, col = divmod(cell, 3)
    return (col * side // 3, row * side // 3, (col + 1) * side // 3, (row + 1) * side // 3)


def _outline(shape: str, center: tuple[int, int], radius: int) -> list[tuple[float, float]]:
    cx, cy = center
    return [(cx + ux * radius, cy + uy * radius) for ux, uy in _OUTLINES[shape]]


def _extent(shape: str, center: tuple[int, int], radius: int) -> tuple[float, float, float, float]:
    """Continuous extent (supersampled pixels) of an object."""
    if shape == "circle":
        r = _CIRCLE_RADIUS * radius
        return (center[0] - r, center[1] - r, center[0] + r, center[1] + r)
    points = _outline(shape, center, radius)
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    return (min(xs), min(ys), max(xs), max(ys))


def _pixel_box(extent: tuple[float, float, float, float], image_size: int) -> Box:
    """Supersampled extent → the box of final pixels it touches (x2, y2 exclusive)."""
    x0, y0, x1, y1 = extent
    s = SUPERSAMPLE

    def lo(v: float) -> int:
        return max(0, int(np.floor(v)) // s)

    def hi(v: float) -> int:
        return min(image_size, int(np.floor(v)) // s + 1)

    return (lo(x0), lo(y0), hi(x1), hi(y1))


@functools.lru_cache(maxsize=32)
def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def _pick(rng: np.random.Generator, options: tuple[str, ...], weights: tuple[float, ...]) -> str:
    return options[int(rng.choice(len(options), p=np.asarray(weights) / sum(weights)))]


def _sample_attributes(rng: np.random.Generator, count: int) -> list[tuple[str, str, str]]:
    """``count`` (shape, colour, size) triples, each colour/shape combination at most once."""
    chosen: list[tuple[str, str, str]] = []
    while len(chosen) < count:
        shapes = [c[0] for c in chosen]
        colours = [c[1] for c in chosen]
        shape = shapes[int(rng.integers(len(shapes)))] if shapes and rng.random() < REUSE_SHAPE else None
        colour = colours[int(rng.integers(len(colours)))] if colours and rng.random() < REUSE_COLOUR else None
        shape = shape or _pick(rng, SHAPES, SHAPE_WEIGHTS)
        colour = colour or _pick(rng, tuple(COLOURS), COLOUR_WEIGHTS)
        size = SIZES[int(rng.integers(2))]
        if all((shape, colour) != (s, c) for s, c, _ in chosen):
            chosen.append((shape, colour, size))
    return chosen


def _sample_layout(
    rng: np.random.Generator, split: str
) -> tuple[tuple[int, int, int], list[int], list[tuple[str, str, str]]]:
    """Background, occupied cells (sorted) and object attributes: the first draws of a scene's stream."""
    background = _background(rng, split)
    count = int(rng.integers(MIN_OBJECTS, MAX_OBJECTS + 1))
    cells = sorted(int(c) for c in rng.choice(9, size=count, replace=False))
    return background, cells, _sample_attributes(rng, count)


def _background(rng: np.random.Generator, split: str) -> tuple[int, int, int]:
    """A light background whose channel sum modulo 3 encodes the split."""
    r, g, b = (int(v) for v in rng.integers(232, 251, size=3))
    b += (SPLITS[split] - (r + g + b)) % 3  # 0, 1 or 2 more: b stays ≤ 252
    return (r, g, b)


def _place_object(
    rng: np.random.Generator, attributes: tuple[str, str, str], cell: int, image_size: int, variant: Variant
) -> ShapeObject:
    shape, colour, size = attributes
    x0, y0, x1, y1 = cell_bounds(cell, image_size, SUPERSAMPLE)
    side = min(x1 - x0, y1 - y0)
    low, high = variant.size_fraction[size]
    radius = round(side * float(rng.uniform(low, high)) / 2)
    jitter = max(0, min((side - 2 * radius) // 2 - _CELL_MARGIN, int(0.12 * side)))
    dx, dy = (int(v) for v in rng.integers(-jitter, jitter + 1, size=2))
    center = ((x0 + x1) // 2 + dx, (y0 + y1) // 2 + dy)
    bbox = _pixel_box(_extent(shape, center, radius), image_size)
    return ShapeObject(shape, colour, size, CELLS[cell], bbox, center, radius)


def _place_word(rng: np.random.Generator, free_cells: list[int], image_size: int, variant: Variant) -> WordLabel:
    text = WORDS[int(rng.integers(len(WORDS)))]
    cell = free_cells[int(rng.integers(len(free_cells)))]
    x0, y0, x1, y1 = cell_bounds(cell, image_size, SUPERSAMPLE)
    if variant.word_scale != 1.0:  # the word's own box: the cell shrunk about its centre
        half = (x1 - x0) * variant.word_scale / 2
        cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
        x0, y0, x1, y1 = round(cx - half), round(cy - half), round(cx + half), round(cy + half)
    room = (x1 - x0) - 2 * _CELL_MARGIN - 4
    scale = SUPERSAMPLE * image_size / DEFAULT_IMAGE_SIZE * variant.word_scale
    font_size = int(_WORD_FONT_SIZES[-1] * scale)
    for size in _WORD_FONT_SIZES:
        if _font(int(size * scale)).getlength(text) <= room:
            font_size = int(size * scale)
            break
    font = _font(font_size)
    left, top, right, bottom = font.getbbox(text, anchor="mm")
    jx = int(max(0, ((x1 - x0) - (right - left)) // 2 - _CELL_MARGIN - 2))
    jy = int(max(0, ((y1 - y0) - (bottom - top)) // 2 - _CELL_MARGIN - 2))
    ax = (x0 + x1) // 2 + int(rng.integers(-jx, jx + 1))
    ay = (y0 + y1) // 2 + int(rng.integers(-jy, jy + 1))
    return WordLabel(text, CELLS[cell], _ink_box(text, font, (ax, ay), image_size), (ax, ay), font_size)


def _ink_box(text: str, font: Any, anchor: tuple[int, int], image_size: int) -> Box:
    """The pixel box of a word's ink, found by drawing it on a full-resolution mask (at most 1 px loose)."""
    mask = Image.new("L", (image_size * SUPERSAMPLE,) * 2, 0)
    ImageDraw.Draw(mask).text(anchor, text, fill=255, font=font, anchor="mm")
    left, top, right, bottom = mask.getbbox() or (0, 0, 1, 1)
    return _pixel_box((left, top, right - 1, bottom - 1), image_size)


def check_image_size(image_size: int | None, variant: str = "default") -> int:
    """``image_size`` (None: the variant's canvas) checked against the variant's minimum; ConfigError if too small."""
    spec = get_variant(variant)
    size = spec.image_size if image_size is None else image_size
    if size < spec.min_image_size:
        what = "ShapesWorld images" if variant == "default" else f"ShapesWorld {variant!r} images"
        raise ConfigError(f"{what} must be at least {spec.min_image_size} px, got {size}")
    return int(size)


def sample_scene(split: str, seed: int, index: int, image_size: int | None = None, variant: str = "default") -> Scene:
    """Draw the layout and ground truth of scene ``index`` of ``split`` (no rendering). Deterministic.

    ``image_size`` defaults to the variant's canvas (128 px for ``default``). Every variant draws the same
    layout for the same ``(split, seed, index)``: background, objects and their cells, the word and its cell.
    """
    image_size = check_image_size(image_size, variant)
    spec = get_variant(variant)
    rng = stream_rng(split, seed, index, stream=1)
    background, cells, attributes = _sample_layout(rng, split)
    objects = [_place_object(rng, attrs, cell, image_size, spec) for cell, attrs in zip(cells, attributes, strict=True)]
    word = None
    if rng.random() < WORD_PROBABILITY:
        word = _place_word(rng, [c for c in range(9) if c not in cells], image_size, spec)
    return Scene(split, seed, index, image_size, background, tuple(objects), word, variant)


def render_scene(scene: Scene) -> Image.Image:
    """Paint a scene: an RGB image of ``scene.image_size`` pixels square."""
    side = scene.image_size * SUPERSAMPLE
    canvas = Image.new("RGB", (side, side), scene.background)
    draw = ImageDraw.Draw(canvas)
    for obj in scene.objects:
        fill = COLOURS[obj.colour]
        if obj.shape == "circle":
            x0, y0, x1, y1 = _extent("circle", obj.center, obj.radius)
            draw.ellipse((x0, y0, x1, y1), fill=fill)
        else:
            draw.polygon(_outline(obj.shape, obj.center, obj.radius), fill=fill)
    if scene.word is not None:
        draw.text(scene.word.anchor, scene.word.text, fill=(0, 0, 0), font=_font(scene.word.font_size), anchor="mm")
    return canvas.reduce(SUPERSAMPLE)


def encode_png(image: Image.Image) -> bytes:
    """PNG bytes of an image, with fixed settings so equal pixels give equal bytes."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=6)
    return buffer.getvalue()


def render_png(scene: Scene) -> bytes:
    """The scene rendered and encoded as PNG."""
    return encode_png(render_scene(scene))


def split_of_image(image: Image.Image) -> str:
    """The split a ShapesWorld image belongs to, read from its background (the top-left pixel)."""
    pixel = image.convert("RGB").getpixel((0, 0))
    code = sum(pixel) % 3  # type: ignore[arg-type]
    return next(name for name, value in SPLITS.items() if value % 3 == code)


@functools.lru_cache(maxsize=1)
def popularity_ranking() -> tuple[tuple[str, str], ...]:
    """All 60 (colour, shape) combinations, most frequent first, counted over :data:`POPULARITY_REFERENCE`.

    Ties break in :data:`COLOURS` then :data:`SHAPES` order. Fixed: it depends on no user seed.
    """
    split, seed, count = POPULARITY_REFERENCE
    counts: Counter[tuple[str, str]] = Counter()
    for index in range(count):
        _, _, attributes = _sample_layout(stream_rng(split, seed, index, stream=1), split)
        counts.update((colour, shape) for shape, colour, _ in attributes)
    combos = [(c, s) for c in COLOURS for s in SHAPES]
    return tuple(sorted(combos, key=lambda combo: -counts[combo]))


def save_gallery(out_dir: str | Path, n: int = 8, split: str = "val", seed: int = 0) -> list[Path]:
    """Write ``n`` sample images (``shapes-<k>.png``) for the docs; returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for index in range(n):
        path = out / f"shapes-{index}.png"
        path.write_bytes(render_png(sample_scene(split, seed, index)))
        paths.append(path)
    return paths
