"""Cells as QuPath-compatible GeoJSON: a FeatureCollection of detection objects whose
``classification`` carries the class name and an RGB colour, so results open over the slide."""

from __future__ import annotations

from engine.classes import get_class

# One colour per lineage; stages inside a lineage share it (QuPath shows names on hover).
LINEAGE_COLOURS = {"erythroid": (200, 30, 45), "granulocytic": (30, 110, 220),
                   "monocytic": (140, 60, 200), "lymphoid": (20, 160, 70),
                   "plasma": (230, 140, 20), "megakaryocytic": (120, 80, 40),
                   "other": (128, 128, 128)}


def cells_to_geojson(cells: list[dict]) -> dict:
    """Cells (dicts with ``cell_id``, ``x0``, ``y0``, ``x1``, ``y1`` in level-0 pixels,
    ``class_code`` and ``class_prob``) -> a GeoJSON FeatureCollection dict."""
    features = []
    for c in cells:
        x0, y0, x1, y1 = (float(c[k]) for k in ("x0", "y0", "x1", "y1"))
        cls = get_class(c["class_code"])
        features.append({
            "type": "Feature",
            "id": str(c["cell_id"]),
            "geometry": {"type": "Polygon",
                         "coordinates": [[[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]]},
            "properties": {
                "objectType": "detection",
                "classification": {"name": f"{cls.code} {cls.name}",
                                   "color": list(LINEAGE_COLOURS[cls.lineage])},
                "measurements": {"class_prob": float(c["class_prob"]),
                                 **({"ood_distance": float(c["ood_distance"])}
                                    if c.get("ood_distance") is not None else {})},
                "isLocked": True,
            },
        })
    return {"type": "FeatureCollection", "features": features}
