"""Typed errors shared by every layer.

Readers raise the `SlideError` subclasses below and keep the backend's exception as ``__cause__``
(``raise SlideCorrupt(...) from err``). The pipeline turns a `SlideError` into a status row with
``error_type = type(err).__name__`` and ``error_message = str(err)``; any other exception is a bug
and is allowed to crash.
"""

from __future__ import annotations


class HemeflowError(Exception):
    """Base class of every error hemeflow raises on purpose."""


class SlideError(HemeflowError):
    """A slide cannot be used; the message says why in words a lab user understands."""

    def __init__(self, uri: str, reason: str):
        super().__init__(f"{uri}: {reason}")
        self.uri = uri
        self.reason = reason

    def __reduce__(self):  # keep the two-argument constructor picklable (Ray ships errors)
        return (type(self), (self.uri, self.reason))


class SlideNotFound(SlideError):
    """No object at that URI (missing file, key or bucket)."""


class SlideAccessDenied(SlideError):
    """The object exists but we may not read it (permissions, credentials)."""


class SlideArchived(SlideAccessDenied):
    """The object is in an archive storage class (S3 Glacier Flexible Retrieval or Deep
    Archive, an Intelligent-Tiering archive tier): it must be restored before it can be read."""


class SlideUnsupported(SlideError):
    """A readable file in a format hemeflow does not process (not a slide, fluorescence, …)."""


class PartOfSlide(SlideUnsupported):
    """A file of a multi-file slide that is read through another of its files (an instance of a
    DICOM series: `engine.slides.dicom`)."""


class SlideCorrupt(SlideError):
    """The file claims a supported format but its bytes cannot be decoded."""


class SlideBeingWritten(SlideError):
    """The slide's file changed since the job listed it: still being written as it was read (a
    scanner's export, a copy to a share under way) or saved over (a rescan), so its reads may
    have failed on the missing part or mixed two versions. The job does not commit it, so the
    next run reads it whole; committed as corrupt, a copy under way was skipped by every
    rerun."""


class SlideCrashedReader(SlideError):
    """Reading the slide killed the process that read it, time after time (a file that crashes
    a native decoder, or whose reading needs more memory than the node has): it fails, where
    Ray would start the process again and retry it for ever (`engine.pipeline.steps.Attempts`)."""


class SlideReadError(SlideError):
    """Opening or reading the slide raised an error its decoder library raises and hemeflow
    does not know, so cannot word (`engine.slides.registry.decoding`): the slide fails with
    the error's type and message, where the error stopped the run over every slide, at every
    rerun. A file the decoder did not expect, most often; a bug, where other software reads
    it."""


class SlideReadTimeout(SlideError):
    """Reading the slide had not ended after ``pipeline.read_timeout_minutes`` (a decoder in a
    loop, a network mount that stopped answering): its process was ended and the slide fails,
    where the read held its run for ever (`engine.pipeline.steps.attempt`)."""


def read_timed_out(uri: str, after: str, what: str = "reading it",
                   then: str = "its process was ended and the slide is not read again"
                   ) -> SlideReadTimeout:
    """The `SlideReadTimeout` of a read (``what``) that had not ended ``after`` (a duration in
    words) and was given up on (``then``)."""
    return SlideReadTimeout(uri, f"{what} had not ended after {after} (a decoder in a loop, a "
                            f"network mount that stopped answering): {then}; --retry-failed "
                            "reads it again (the limit: pipeline.read_timeout_minutes)")


class StorageStalled(HemeflowError):
    """`HUNG_IN_A_ROW` slides in a row failed `SlideReadTimeout`: the storage they are on (a
    network mount) has stopped answering, not their files, and each slide left would hang
    as long; the job stops, what it committed staying."""


HUNG_IN_A_ROW = 3  # slides whose reads hung, no read ending between, on which a job stops


def storage_stalled(names: list[str], what: str = "slides' reads hung in a row (failed "
                    "SlideReadTimeout)", left: str = "slide") -> StorageStalled:
    """``names``: what hung, in the order found."""
    shown = ", ".join(names[:3]) + (", …" if len(names) > 3 else "")
    return StorageStalled(f"{len(names)} {what}, no read ending between them ({shown}): the "
                          f"storage they are on seems to have stopped answering, and every "
                          f"{left} left would hang as long; stopped. What is committed stays: "
                          "once it answers (does `ls` of it?), run again with --retry-failed "
                          f"(if it does, those {left}s hang their decoder: leave them out of "
                          "the input)")


def hung_in_a_row(so_far: list[str], name: str, hung: bool, **words) -> list[str]:
    """The names that hung in a row, ``so_far`` with ``name`` (read in that order; ``hung``:
    whether its read hung); raises `StorageStalled` (``words``: `storage_stalled`'s) once
    `HUNG_IN_A_ROW` have: on a mount that stopped answering every read fails so, each after
    its own time-out, and an archive's job went on for days (the pipeline, whose failures
    reach its driver late, asks its `Attempts` instead: `hung_unanswered`)."""
    so_far = [*so_far, name] if hung else []
    if len(so_far) >= HUNG_IN_A_ROW:
        raise storage_stalled(so_far, **words)
    return so_far


class MissingMPP(SlideError):
    """The slide carries no usable pixel size and none was supplied (``--mpp`` / ``--mpp-table``)."""


class ResolutionTooLow(SlideError):
    """The slide's pixels are coarser than a stage needs by more than the allowed upsampling."""


class StagingError(SlideError):
    """A remote object could not be staged locally (too large for the cache, disk full, …)."""


class StagingFull(StagingError):
    """The node's staging folder or disk had no room for the object (copies in use, other
    files): the node's condition at that moment, not the slide's, so a job does not commit it
    (`NOT_COMMITTED`) and the next run reads the slide."""


class StorageCredentialsError(SlideError):
    """Object storage refuses the credentials themselves (expired, unknown, wrongly signed):
    every request would fail alike, so the job stops, where failing each slide in turn would
    mark an archive failed in minutes. A `SlideError` so that the steps that meet it carry it
    to the job's driver as they carry a slide's failure; the driver stops on it
    (`STOPS_THE_JOB`) rather than commit it."""


STOPS_THE_JOB = ("StorageCredentialsError",)  # error types a job stops on, committing nothing
# a slide's failures of the moment, not of its file: reported, not committed, so the next run
# reads the slide (its file still being written; no room to stage it)
NOT_COMMITTED = ("SlideBeingWritten", "StagingFull")


def stop_if_it_stops_the_job(error_type: str | None, message: str | None) -> None:
    """Raise again the error a slide's row carries (its type and message: ``uri: reason``)
    where it is one a job stops on (`STOPS_THE_JOB`), rather than commit it."""
    if error_type in STOPS_THE_JOB:
        uri, _, reason = (message or "").partition(": ")
        raise StorageCredentialsError(uri, reason)


class CheckpointError(HemeflowError):
    """A checkpoint is missing, refused (pickle) or does not fit the model."""


class MissingWeights(CheckpointError):
    """A stage was asked to run a model that has no trained weights (here, not in
    `engine.models`, so that a job names it without importing torch: its ``--help`` and its
    argument errors answer at once)."""


class NotOnEveryNode(HemeflowError):
    """A local slide another node of the cluster did not find, though the job's driver sees
    it: the archive is not at the same path on every node. Every slide read there would fail
    alike and be committed failed, so the job stops, committing nothing for it."""


class OutputFull(HemeflowError, OSError):
    """No space left on the disk (or quota) an output is written to. The job stops: every
    file after would fail alike. Its partial file is removed, and what was written whole
    before stays (`engine.outputs.write_bytes`)."""


class TransientStorageError(HemeflowError):
    """A storage call failed in a way worth retrying (timeouts, throttling, 5xx)."""


class ConfigError(HemeflowError, ValueError):
    """A configuration value or key is wrong; the message lists what is valid."""
