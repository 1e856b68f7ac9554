"""Specimen types: what a slide is decides which of its results mean anything.

A differential counts the cells spread in a smear: DeepHeme classifies Wright-Giemsa-stained
cells of aspirate and blood smears, not cells cut through in an H&E section. Marrow cellularity
is the share of the marrow space that cells fill in a section (trephine core or clot); a smear
has no marrow space, and the label-free estimate reads its spread cells as 100 % cellular.

So a slide whose type is known runs only what applies to it:

    aspirate, blood  cells, differential, tile embeddings (where an encoder has weights: a
                     smear's tiles are read for nothing else); no cellularity
    biopsy, clot     tiles (and embeddings), cellularity; no cells, no differential
    unknown          every configured stage (the default: the job cannot tell a smear from a
                     section by itself)

Slides get their type from the input list (a ``specimen`` column of the ``.csv`` list or of an
inventory ``.parquet``) or, for those without one, from ``--specimen``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from engine.errors import HemeflowError

UNKNOWN = "unknown"
SPECIMENS = {
    "aspirate": "bone-marrow aspirate smear",
    "blood": "peripheral blood smear",
    "biopsy": "bone-marrow trephine (core) biopsy section",
    "clot": "bone-marrow clot section",
    UNKNOWN: "type not given: every configured stage runs",
}
SMEARS = frozenset({"aspirate", "blood"})
SECTIONS = frozenset({"biopsy", "clot"})

# the stages (as `engine.pipeline.run.resolve_stages` names them, before any ":") that a
# specimen type leaves out, and why
CELL_STAGES = ("cell_detection", "cell_classification", "differential")
CELLULARITY_STAGES = ("cellularity",)
WHY_NO_CELLS = "cells are classified and counted on smears (aspirate, blood), not in sections"
WHY_NO_CELLULARITY = ("cellularity is measured on sections (biopsy, clot), not on smears, "
                      "whose tiles are read only for an encoder's embeddings")


class SpecimenError(HemeflowError, ValueError):
    """A specimen type that is not one of `SPECIMENS`."""


def parse_specimen(text: str | None, where: str = "") -> str:
    """A specimen type from user text: one of `SPECIMENS` in any case; blank means unknown.

    Raises:
        SpecimenError: any other text (``where`` says where it was found).
    """
    name = (text or "").strip().lower() or UNKNOWN
    if name not in SPECIMENS:
        raise SpecimenError(f"{where + ': ' if where else ''}{text!r} is not a specimen type; "
                            "one of: " + ", ".join(f"{k} ({v})" for k, v in SPECIMENS.items()))
    return name


def branches_for(specimen: str, branches: tuple[str, ...],
                 embeddings: bool = True) -> tuple[str, ...]:
    """The pipeline branches (``cells``, ``tiles``) that run for a slide of this type: a
    section has no cells branch; a smear has a tiles branch only where ``embeddings`` (an
    encoder with weights) are made, its tiles' one use."""
    return tuple(b for b in branches
                 if not (b == "cells" and specimen in SECTIONS)
                 and not (b == "tiles" and specimen in SMEARS and not embeddings))


def _name(stage: str) -> str:
    """A stage as ``skipped_stages`` names it: without its model (``cell_classification``)
    and notes, but a cellularity with its method (``cellularity:abmil``)."""
    stage = stage.split(" ", 1)[0]
    return stage if stage.startswith("cellularity") else stage.split(":", 1)[0]


def left_out(specimen: str, stage: str, embeddings: bool = True) -> bool:
    """Whether a slide of this type leaves out ``stage`` (``cell_classification:deepheme-…``,
    ``cellularity:abmil``: the part before ``:`` decides)."""
    base = _name(stage).split(":", 1)[0]
    return (specimen in SECTIONS and base in CELL_STAGES) or \
        (specimen in SMEARS and (base in CELLULARITY_STAGES
                                 or (base == "tiles" and not embeddings)))


def slide_stages(specimen: str, run: list[str], skipped: list[str], embeddings: bool = True
                 ) -> tuple[list[str], list[str]]:
    """The stages that ran for one slide of this type, and those skipped (the run's skipped
    stages plus those its type leaves out, by name without the model)."""
    out = [s for s in run if left_out(specimen, s, embeddings)]
    return [s for s in run if s not in out], sorted(set(skipped) | {_name(s) for s in out})


def why_left_out(specimen: str) -> str:
    """What a slide of this type leaves out, and why ('' for none)."""
    if specimen in SECTIONS:
        return WHY_NO_CELLS
    if specimen in SMEARS:
        return WHY_NO_CELLULARITY
    return ""


@dataclass(frozen=True)
class Specimens:
    """Each slide's specimen type: from the input list by URI where it names one (not
    ``unknown``), else ``default``."""

    default: str = UNKNOWN
    table: dict[str, str] = field(default_factory=dict)

    def of(self, uri: str) -> str:
        typed = self.table.get(uri, UNKNOWN)
        return typed if typed != UNKNOWN else self.default
