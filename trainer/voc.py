"""Pascal VOC box annotations (NEU-DET): one XML per image, named after the image."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path


class VocError(ValueError):
    pass


Corners = tuple[float, float, float, float]  # (x0, y0, x1, y1), half-open pixel box, 0-based


@dataclass(frozen=True)
class VocObject:
    """One annotated object: its class name and its box, VOC's 1-based inclusive (xmin, ymin, xmax, ymax)
    as corners (xmin - 1, ymin - 1, xmax, ymax)."""

    name: str
    corners: Corners


@dataclass(frozen=True)
class VocAnnotation:
    filename: str
    width: int
    height: int
    objects: tuple[VocObject, ...]


def _number(node: ET.Element, tag: str, path: Path) -> float:
    text = node.findtext(tag)
    try:
        return float(text)
    except (TypeError, ValueError):
        raise VocError(f"{path}: <{tag}> is missing or not a number ({text!r})") from None


def read_voc(path: str | Path) -> VocAnnotation:
    path = Path(path)
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as err:
        raise VocError(f"{path}: not well-formed XML ({err})") from None
    size = root.find("size")
    if size is None:
        raise VocError(f"{path}: no <size> element")
    objects = []
    for obj in root.iterfind("object"):
        bnd = obj.find("bndbox")
        if bnd is None:
            raise VocError(f"{path}: an <object> without <bndbox>")
        xmin, ymin, xmax, ymax = (_number(bnd, t, path) for t in ("xmin", "ymin", "xmax", "ymax"))
        if xmax < xmin or ymax < ymin:
            raise VocError(f"{path}: inverted box {(xmin, ymin, xmax, ymax)}")
        objects.append(VocObject((obj.findtext("name") or "").strip(), (xmin - 1, ymin - 1, xmax, ymax)))
    return VocAnnotation(
        filename=(root.findtext("filename") or "").strip(),
        width=int(_number(size, "width", path)), height=int(_number(size, "height", path)), objects=tuple(objects),
    )


def annotation_path(boxes_dir: Path, image_path: str) -> Path:
    """`crazing/crazing_1.jpg` → boxes_dir/crazing_1.xml (NEU-DET's flat layout)."""
    return boxes_dir / f"{Path(image_path).stem}.xml"
