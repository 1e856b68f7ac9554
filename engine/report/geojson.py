"""Cells as QuPath-compatible GeoJSON: a FeatureCollection of detection objects whose
``classification`` carries the class name and an RGB colour, so results open over the slide."""

from __future__ import annotations

import json

import numpy as np

from engine.classes import get_class

# One colour per lineage; stages inside a lineage share it (QuPath shows names on hover).
LINEAGE_COLOURS = {"erythroid": (200, 30, 45), "granulocytic": (30, 110, 220),
                   "monocytic": (140, 60, 200), "lymphoid": (20, 160, 70),
                   "plasma": (230, 140, 20), "megakaryocytic": (120, 80, 40),
                   "other": (128, 128, 128)}


# a platelet-sized detection the classifier did not see (pipeline.classifier.platelets: false)
UNCLASSIFIED = json.dumps({"name": "platelet (not classified)",
                           "color": list(LINEAGE_COLOURS["megakaryocytic"])})


def _classification(code: str) -> str:
    if not code:
        return UNCLASSIFIED
    cls = get_class(code)
    return json.dumps({"name": f"{cls.code} {cls.name}",
                       "color": list(LINEAGE_COLOURS[cls.lineage])})


def _id(v) -> str:
    return f'"{v}"' if isinstance(v, int) else json.dumps(str(v))


def _measure(name: str, column, n: int) -> list[str]:
    """A measurement column as each cell's JSON text (``, "name": value``), empty where
    unknown (None or NaN) or not given."""
    if column is None:
        return [""] * n
    return ["" if v is None or v != v else f', "{name}": {float(v)!r}'
            for v in np.asarray(column, object)]


def cells_geojson_text(cell_id, x0, y0, x1, y1, class_code, class_prob,
                       ood_distance=None, blur_um=None) -> str:
    """The cells' FeatureCollection as JSON text, from columns (one value per cell; boxes in
    level-0 pixels; ``ood_distance`` and ``blur_um`` NaN or None where unknown: then left out
    of the cell's measurements; an empty ``class_code``: not classified, no ``class_prob``).
    The same text as ``json.dumps(cells_to_geojson(...))``, written from a template: a slide
    of 100k cells would otherwise build 100k nested dicts on the driver, at several times the
    cost."""
    classes: dict[str, str] = {}
    n = len(cell_id)
    extra = [a + b for a, b in zip(_measure("ood_distance", ood_distance, n),
                                   _measure("blur_um", blur_um, n))]
    # each coordinate's text once (json.dumps writes floats as repr does)
    xs0, ys0, xs1, ys1 = (list(map(repr, np.asarray(v, np.float64).tolist()))
                          for v in (x0, y0, x1, y1))
    parts = []
    for i, a, b, c, d, code, p, more in zip(cell_id, xs0, ys0, xs1, ys1, class_code,
                                            np.asarray(class_prob, np.float64).tolist(), extra):
        code = str(code)
        if code not in classes:
            classes[code] = _classification(code)
        measured = f'"class_prob": {p!r}{more}' if code else more.removeprefix(", ")
        parts.append(
            f'{{"type": "Feature", "id": {_id(i)}, "geometry": {{"type": "Polygon", '
            f'"coordinates": [[[{a}, {b}], [{c}, {b}], [{c}, {d}], [{a}, {d}], [{a}, {b}]]]}}, '
            f'"properties": {{"objectType": "detection", "classification": {classes[code]}, '
            f'"measurements": {{{measured}}}, "isLocked": true}}}}')
    return '{"type": "FeatureCollection", "features": [' + ", ".join(parts) + "]}"


def cells_to_geojson(cells: list[dict]) -> dict:
    """Cells (dicts with ``cell_id``, ``x0``, ``y0``, ``x1``, ``y1`` in level-0 pixels,
    ``class_code``, ``class_prob`` and optionally ``ood_distance`` and ``blur_um``) -> a
    GeoJSON FeatureCollection dict."""
    cols = {k: [c[k] for c in cells] for k in ("cell_id", "x0", "y0", "x1", "y1", "class_code",
                                                "class_prob")}
    return json.loads(cells_geojson_text(**cols, ood_distance=[c.get("ood_distance")
                                                               for c in cells],
                                         blur_um=[c.get("blur_um") for c in cells]))
