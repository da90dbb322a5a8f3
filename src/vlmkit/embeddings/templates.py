"""Prompt templates for zero-shot labels: each a string with one ``{}`` where the label goes.

``imagenet`` is the list of 80 templates the CLIP paper used for ImageNet (OpenAI's notebook; open_clip's
``OPENAI_IMAGENET_TEMPLATES``); a label's text embedding is the mean of its normalised template embeddings,
normalised again, as CLIP computes it. ``shapes`` suits the built-in ``clip-shapes`` model (ShapesWorld's caption
phrasing). A file of one template per line is accepted wherever a set name is.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from vlmkit.errors import ConfigError
from vlmkit.registry import Registry

IMAGENET_TEMPLATES = (
    "a bad photo of a {}.", "a photo of many {}.", "a sculpture of a {}.", "a photo of the hard to see {}.",
    "a low resolution photo of the {}.", "a rendering of a {}.", "graffiti of a {}.", "a bad photo of the {}.",
    "a cropped photo of the {}.", "a tattoo of a {}.", "the embroidered {}.", "a photo of a hard to see {}.",
    "a bright photo of a {}.", "a photo of a clean {}.", "a photo of a dirty {}.", "a dark photo of the {}.",
    "a drawing of a {}.", "a photo of my {}.", "the plastic {}.", "a photo of the cool {}.",
    "a close-up photo of a {}.", "a black and white photo of the {}.", "a painting of the {}.",
    "a painting of a {}.", "a pixelated photo of the {}.", "a sculpture of the {}.", "a bright photo of the {}.",
    "a cropped photo of a {}.", "a plastic {}.", "a photo of the dirty {}.", "a jpeg corrupted photo of a {}.",
    "a blurry photo of the {}.", "a photo of the {}.", "a good photo of the {}.", "a rendering of the {}.",
    "a {} in a video game.", "a photo of one {}.", "a doodle of a {}.", "a close-up photo of the {}.",
    "a photo of a {}.", "the origami {}.", "the {} in a video game.", "a sketch of a {}.", "a doodle of the {}.",
    "a origami {}.", "a low resolution photo of a {}.", "the toy {}.", "a rendition of the {}.",
    "a photo of the clean {}.", "a photo of a large {}.", "a rendition of a {}.", "a photo of a nice {}.",
    "a photo of a weird {}.", "a blurry photo of a {}.", "a cartoon {}.", "art of a {}.", "a sketch of the {}.",
    "a embroidered {}.", "a pixelated photo of a {}.", "itap of the {}.", "a jpeg corrupted photo of the {}.",
    "a good photo of a {}.", "a plushie {}.", "a photo of the nice {}.", "a photo of the small {}.",
    "a photo of the weird {}.", "the cartoon {}.", "art of the {}.", "a drawing of the {}.",
    "a photo of the large {}.", "a black and white photo of a {}.", "the plushie {}.", "a dark photo of a {}.",
    "itap of a {}.", "graffiti of the {}.", "a toy {}.", "itap of my {}.", "a photo of a cool {}.",
    "a photo of a small {}.", "a tattoo of the {}.",
)  # fmt: skip
"""The CLIP paper's 80 ImageNet prompt templates, in its order."""

TEMPLATES: Registry[tuple[str, ...]] = Registry("template set")
TEMPLATES.add("imagenet", IMAGENET_TEMPLATES)
TEMPLATES.add("simple", ("a photo of a {}.",))
TEMPLATES.add("none", ("{}",))


def _shapes_templates() -> tuple[str, ...]:
    from vlmkit.data.shapes import CELLS, SIZES
    from vlmkit.data.tasks import _CELL_PHRASES

    return tuple(f"There is one object: a {size} {{}} {_CELL_PHRASES[cell]}." for size in SIZES for cell in CELLS)


TEMPLATES.add("shapes", _shapes_templates())


def resolve_templates(spec: str | Path | Sequence[str]) -> tuple[str, ...]:
    """Templates from a set name, a file (one per line, blank lines skipped) or a list; each needs one ``{}``."""
    if not isinstance(spec, str | Path):
        templates = tuple(spec)
        where = "templates"
    elif isinstance(spec, str) and spec in TEMPLATES:
        return TEMPLATES.get(spec)
    elif Path(spec).is_file():
        templates = tuple(line.strip() for line in Path(spec).read_text(encoding="utf-8").splitlines() if line.strip())
        where = str(spec)
    else:
        raise ConfigError(f"templates {str(spec)!r}: not a template set ({', '.join(TEMPLATES.names())}) nor a file")
    bad = [t for t in templates if not isinstance(t, str) or t.count("{}") != 1]
    if not templates or bad:
        shown = bad[:3] or "none given"
        raise ConfigError(f"{where}: every template needs exactly one '{{}}' for the label; bad: {shown}")
    return templates
