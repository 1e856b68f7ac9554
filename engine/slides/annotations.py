"""Reading box annotations (Pascal VOC XML, as BCCD ships them)."""

from __future__ import annotations

import xml.etree.ElementTree as ET


def read_voc_boxes(path: str, name: str = "WBC") -> list[tuple[float, float, float, float]]:
    """``(xmin, ymin, xmax, ymax)`` of every object called ``name`` (case-insensitive)."""
    root = ET.parse(path).getroot()
    boxes = []
    for obj in root.findall("object"):
        if obj.findtext("name", "").strip().upper() == name.upper():
            bb = obj.find("bndbox")
            boxes.append(tuple(float(bb.findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax")))
    return boxes
