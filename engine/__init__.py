"""hemeflow engine: slide IO, tiling, models and the Ray pipeline for hematopathology archives.

Importing ``engine`` does no work and pulls in nothing heavy; import the submodule you need.

Versions: a release whose results differ from the one before (the same slides and config give
other rows: another reference checkpoint, another way of reading or resampling pixels) raises
the minor version (the major one after 1.0); a release whose results are the same raises the
patch. An output records the version that made it, and a rerun resumes it only in the same
results release (`results_release`; README "Versions").
"""

__version__ = "0.8.19"


def results_release(version: str = __version__) -> str:
    """The part of ``version`` that says which results it gives: ``"0.2"`` for ``"0.2.1"``
    (``"2"`` for ``"2.0.3"``, after 1.0)."""
    parts = version.split(".")
    return parts[0] if parts[0] not in ("", "0") else ".".join(parts[:2])
