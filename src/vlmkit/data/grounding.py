"""Every grounding box in a text, with the label it belongs to (Qwen-VL's ``<ref>``), and the reverse.

Recognised, in the order written:

- Qwen-VL ``<ref>a dog</ref><box>(221,423),(569,886)</box>``, several ``<box>`` after one ``<ref>`` (all of
  that label), and Qwen2-VL's ``<|object_ref_start|>…<|object_ref_end|><|box_start|>…<|box_end|>``: corners
  normalised to ``[0, qwen_scale)`` (1000);
- Qwen2.5-VL JSON objects ``{"bbox_2d": [x1, y1, x2, y2], "label": "a dog"}``: absolute pixels (of
  ``input_size`` when given);
- with none of those, plain ``[x1, y1, x2, y2]`` lists (pixels, or 0-1 fractions as
  :func:`vlmkit.evaluation.metrics.parse_box` reads them; unlabelled).

The coordinate rules are those of :func:`~vlmkit.evaluation.metrics.parse_box`, which reads only the first box.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

Box = tuple[float, float, float, float]

_NUM = r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)"
_PAIR = rf"\(\s*({_NUM})\s*,\s*({_NUM})\s*\)\s*,?\s*\(\s*({_NUM})\s*,\s*({_NUM})\s*\)"
_QWEN = re.compile(
    r"(?:<ref>(?P<ref>.*?)</ref>|<\|object_ref_start\|>(?P<ref2>.*?)<\|object_ref_end\|>)"
    rf"|(?:<box>|<\|box_start\|>)\s*{_PAIR}\s*(?:</box>|<\|box_end\|>)",
    re.S,
)
_BBOX_2D = re.compile(r"\{[^{}]*?[\"']bbox_2d[\"']\s*:\s*\[([^\]]*)\][^{}]*\}")
_LABEL = re.compile(r"[\"']label[\"']\s*:\s*[\"']((?:[^\"'\\]|\\.)*)[\"']")
_LIST = re.compile(rf"\[\s*({_NUM})\s*,\s*({_NUM})\s*,\s*({_NUM})\s*,\s*({_NUM})\s*\]")


@dataclass(frozen=True)
class LabeledBox:
    """One box ``(x1, y1, x2, y2)`` in pixels of the image, and its label (None when the text gives none)."""

    label: str | None
    box: Box


def _scaled(values: Iterable[float], sx: float, sy: float) -> Box:
    x1, y1, x2, y2 = values
    return (x1 * sx, y1 * sy, x2 * sx, y2 * sy)


def parse_boxes(
    text: str,
    width: float,
    height: float,
    *,
    box_format: Literal["auto", "pixels", "normalized"] = "auto",
    qwen_scale: float = 1000.0,
    input_size: tuple[float, float] | None = None,
) -> list[LabeledBox]:
    """Every box of a model answer or a dataset answer, in order, as pixels of a ``width`` × ``height`` image."""
    pixel = (1.0, 1.0) if input_size is None else (width / input_size[0], height / input_size[1])
    out: list[LabeledBox] = []
    label: str | None = None
    for match in _QWEN.finditer(text):
        if match.group("ref") is not None or match.group("ref2") is not None:
            label = (match.group("ref") if match.group("ref") is not None else match.group("ref2")).strip()
            continue
        values = [float(v) for v in match.groups()[2:6]]
        out.append(LabeledBox(label, _scaled(values, width / qwen_scale, height / qwen_scale)))
    if out:
        return out
    for match in _BBOX_2D.finditer(text):
        values = [float(v) for v in re.findall(_NUM, match.group(1))]
        if len(values) == 4:
            found = _LABEL.search(match.group(0))
            out.append(LabeledBox(found.group(1) if found else None, _scaled(values, *pixel)))
    if out:
        return out
    for match in _LIST.finditer(text):
        raw = match.groups()
        values = [float(v) for v in raw]
        normalized = box_format == "normalized" or (
            box_format == "auto" and all(0.0 <= v <= 1.0 for v in values) and any("." in v for v in raw)
        )
        out.append(LabeledBox(None, _scaled(values, width, height) if normalized else _scaled(values, *pixel)))
    return out


def format_boxes(boxes: Iterable[LabeledBox], width: float, height: float, *, qwen_scale: float = 1000.0) -> str:
    """Qwen-VL's grounding text of ``boxes``: ``<ref>label</ref><box>(x1,y1),(x2,y2)</box>`` per label, with
    consecutive boxes of one label after one ``<ref>``; corners normalised to ``[0, qwen_scale)``."""
    parts: list[str] = []
    previous: object = object()
    for item in boxes:
        if item.label is not None and item.label != previous:
            parts.append(f"<ref>{item.label}</ref>")
        previous = item.label
        x1, y1, x2, y2 = (
            round(v * qwen_scale / size) for v, size in zip(item.box, (width, height, width, height), strict=True)
        )
        parts.append(f"<box>({x1},{y1}),({x2},{y2})</box>")
    return "".join(parts)
