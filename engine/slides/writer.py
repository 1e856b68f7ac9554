"""Write tiled pyramidal TIFFs (JPEG tiles, pixel size in the resolution tags) with libvips, and
DICOM whole-slide images (a series of JPEG-tiled levels) with pydicom.

Used to build slides the project needs itself: synthetic test slides, benchmark slides and the
blood-smear slide assembled from real BCCD fields.
"""

from __future__ import annotations

import os

import numpy as np
import pyvips


def write_pyramid_tiff(image: np.ndarray | pyvips.Image, path: str, mpp: float,
                       tile_px: int = 256, quality: int = 90, compression: str = "jpeg") -> None:
    """Save an RGB image as a tiled pyramid that OpenSlide opens as ``generic-tiff``.

    Args:
        image: ``(H, W, 3) uint8`` array or a 3-band uchar `pyvips.Image` (may be lazy and huge).
        path: destination ``.tif`` path.
        mpp: µm per level-0 pixel, written as TIFF resolution (pixels per centimetre).
        tile_px: tile side.
        quality: JPEG quality.
        compression: ``jpeg``, ``deflate``, ``lzw`` or ``none``.
    """
    img = pyvips.Image.new_from_array(image) if isinstance(image, np.ndarray) else image
    if img.bands != 3 or img.format != "uchar":
        raise ValueError(f"expected 3-band uchar RGB, got {img.bands} bands of {img.format}")
    px_per_mm = 1000.0 / mpp
    img = img.copy(interpretation="srgb", xres=px_per_mm, yres=px_per_mm)
    img.tiffsave(path, tile=True, tile_width=tile_px, tile_height=tile_px, pyramid=True,
                 compression=compression, Q=quality, resunit="cm", bigtiff=img.width *
                 img.height * 3 > 2**31)


_WSI_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.77.1.6"  # VL Whole Slide Microscopy Image Storage


def write_dicom_series(image: np.ndarray | pyvips.Image, folder: str, mpp: float,
                       tile_px: int = 256,
                       quality: int = 90, offsets: str = "basic", stem: str = "level"
                       ) -> list[str]:
    """Save an RGB image as a DICOM whole-slide image that OpenSlide opens as ``dicom``: a
    series of one file per pyramid level (``<stem>_<n>.dcm``, each half the one before, down to
    one tile), JPEG frames of ``tile_px`` in TILED_FULL order, as converters write them.

    Args:
        image: ``(H, W, 3) uint8`` array or a 3-band uchar `pyvips.Image` (may be lazy).
        folder: where the files go (made if missing).
        mpp: µm per level-0 pixel.
        offsets: where a reader finds each frame: ``basic`` (the offset table in the pixel
            data), ``extended`` (the Extended Offset Table, as files over 4 GB must) or ``none``
            (a reader walks the frames one by one).

    Returns:
        The files' paths, level 0 first.
    """
    import pydicom
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.encaps import encapsulate, encapsulate_extended
    from pydicom.uid import JPEGBaseline8Bit, generate_uid

    if offsets not in ("basic", "extended", "none"):
        raise ValueError(f"offsets must be basic, extended or none, got {offsets!r}")
    os.makedirs(folder, exist_ok=True)
    img = pyvips.Image.new_from_array(np.ascontiguousarray(image)) \
        if isinstance(image, np.ndarray) else image
    width, height = img.width, img.height
    study, series, frame_of_reference = generate_uid(), generate_uid(), generate_uid()
    paths: list[str] = []
    while True:
        level, (w, h) = len(paths), (img.width, img.height)
        across, down = -(-w // tile_px), -(-h // tile_px)
        padded = img.embed(0, 0, across * tile_px, down * tile_px, extend="white")
        frames = [padded.crop(c * tile_px, r * tile_px, tile_px, tile_px)
                  .jpegsave_buffer(Q=quality, subsample_mode="on")
                  for r in range(down) for c in range(across)]
        ds = Dataset()
        ds.SOPClassUID, ds.SOPInstanceUID = _WSI_SOP_CLASS, generate_uid()
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.FrameOfReferenceUID = frame_of_reference
        ds.Modality, ds.Manufacturer, ds.InstanceNumber, ds.SeriesNumber = "SM", "hemeflow", \
            level + 1, 1
        ds.ImageType = ["DERIVED" if level else "ORIGINAL", "PRIMARY", "VOLUME",
                        "RESAMPLED" if level else "NONE"]
        for key in ("PatientName", "PatientID", "StudyDate", "StudyTime", "AccessionNumber",
                    "ReferringPhysicianName", "StudyID"):
            setattr(ds, key, "")
        ds.DimensionOrganizationType = "TILED_FULL"
        ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = \
            3, "YBR_FULL_422", 0
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
        ds.NumberOfFrames, ds.Rows, ds.Columns = len(frames), tile_px, tile_px
        ds.TotalPixelMatrixColumns, ds.TotalPixelMatrixRows = w, h
        ds.TotalPixelMatrixFocalPlanes, ds.NumberOfOpticalPaths = 1, 1
        ds.ImagedVolumeWidth, ds.ImagedVolumeHeight = width * mpp / 1000, height * mpp / 1000
        ds.LossyImageCompression = "01"
        measures = Dataset()
        measures.PixelSpacing = [mpp * height / h / 1000, mpp * width / w / 1000]  # mm
        measures.SliceThickness = 0.001
        groups = Dataset()
        groups.PixelMeasuresSequence = [measures]
        ds.SharedFunctionalGroupsSequence = [groups]
        path = Dataset()
        path.OpticalPathIdentifier = "1"
        ds.OpticalPathSequence = [path]
        if offsets == "extended":
            ds.PixelData, ds.ExtendedOffsetTable, ds.ExtendedOffsetTableLengths = \
                encapsulate_extended(frames)
        else:
            ds.PixelData = encapsulate(frames, has_bot=offsets == "basic")
        ds["PixelData"].VR, ds["PixelData"].is_undefined_length = "OB", True
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = _WSI_SOP_CLASS
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
        paths.append(os.path.join(folder, f"{stem}_{level}.dcm"))
        pydicom.dcmwrite(paths[-1], ds, enforce_file_format=True)
        if max(w, h) <= tile_px:
            return paths
        img = img.resize(0.5, kernel="linear")
        if img.width * img.height * 3 <= 2**28:
            img = img.copy_memory()  # each frame's crop would compute it again
