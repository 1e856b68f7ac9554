"""Frozen configuration dataclasses.

YAML is read only in ``jobs/``; the engine receives these objects. ``from_dict`` rejects unknown
keys and names the valid ones, so a typo in a config file fails loudly instead of being ignored.
Credentials never live here: S3 keys come from the environment or an AWS profile, read by botocore.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import types
import typing
import urllib.parse
from dataclasses import dataclass, field
from typing import Any, TypeVar

from engine.errors import ConfigError
from engine.specimen import SPECIMENS

T = TypeVar("T")

# Keys that would carry secrets; refused so they can never be dumped next to the outputs.
_SECRET_KEYS = {"key", "secret", "token", "aws_access_key_id", "aws_secret_access_key",
                "aws_session_token", "password"}


PROTOCOLS = ("s3", "s3a", "file")  # what hemeflow reads and writes: S3 (and its kin) or a path


def unsupported_storage(uri: str) -> str | None:
    """Why ``uri`` names a storage hemeflow does not use (`PROTOCOLS`), or None: fsspec would
    look for a library not installed (gcsfs for gs://) or read over plain HTTP."""
    protocol = uri.split("://", 1)[0].lower() if "://" in uri else "file"
    if protocol in PROTOCOLS:
        return None
    return (f"{uri}: {protocol}:// storage is not supported: give an s3:// URI (AWS S3, or a "
            "store with S3's API through --s3-endpoint: MinIO, Ceph) or a local path (a share "
            "or a bucket mounted on every node: gcsfuse, blobfuse2)")


@dataclass(frozen=True)
class StorageConfig:
    """How to reach object storage and where to stage remote slides for path-based readers.

    Attributes:
        endpoint_url: S3 endpoint (MinIO, moto, Ceph…); None means AWS.
        region: S3 region name.
        anon: read public buckets without credentials.
        profile: AWS profile name (credentials stay in ``~/.aws``).
        stage_dir: local folder for staged objects, shared by every hemeflow process on the
            node; None means ``<temp dir>/hemeflow-stage-<uid>``.
        stage_max_bytes: bound on the staging folder; least recently used copies not in use are
            evicted to stay under it, and a larger single object is refused.
        stage_shared: True: each object is downloaded once per node and kept (up to the bound)
            for every process that reads it, and the job empties the folder when it ends.
            False: each process stages its own copies (the behaviour before the shared folder,
            kept as a benchmark baseline).
        retries: attempts for transient storage errors (timeouts, throttling, 5xx).
        retry_backoff_s: first back-off; doubles on each retry.
        write_threads: a run's output files written at once, on threads beside the driver's
            intake (`engine.pipeline.aggregate.Aggregator`); 1 writes each in the intake.
        sparse_reads: where a job reads little of a remote SVS or generic TIFF (the inventory,
            the maps, galleries and exports, a section's tiles branch), fetch by range what it
            reads (`engine.slides.header_copy`); False stages every slide whole, as before
            release 0.8.3 (for a store whose range requests cost as much as the object).
    """

    endpoint_url: str | None = None
    region: str | None = None
    anon: bool = False
    profile: str | None = None
    stage_dir: str | None = None
    stage_max_bytes: int = 20 * 1024**3
    stage_shared: bool = True
    retries: int = 4
    retry_backoff_s: float = 0.5
    write_threads: int = 8
    sparse_reads: bool = True

    def __post_init__(self):
        if self.endpoint_url is not None:
            url = urllib.parse.urlsplit(str(self.endpoint_url))
            if url.username is not None or url.password is not None:
                raise ConfigError("storage.endpoint_url (--s3-endpoint) holds credentials: give "
                                  "the URL without them, and the keys through the environment "
                                  "or an AWS profile, so they never reach logs or outputs")
            if url.scheme not in ("http", "https") or not url.hostname:
                raise ConfigError("storage.endpoint_url (--s3-endpoint) must be a URL with its "
                                  "scheme, like http://127.0.0.1:9000 or https://s3.example.org; "
                                  f"got {self.endpoint_url!r}")
        if self.write_threads < 1:
            raise ConfigError(f"storage.write_threads must be at least 1, got "
                              f"{self.write_threads}")
        if self.retries < 0 or self.retry_backoff_s < 0:
            raise ConfigError(f"storage.retries and storage.retry_backoff_s must be at least 0, "
                              f"got {self.retries} and {self.retry_backoff_s}")

    def fsspec_options(self, protocol: str) -> dict[str, Any]:
        """fsspec keyword options for ``protocol``; credentials are left to botocore's chain."""
        if protocol not in ("s3", "s3a"):
            return {}
        opts: dict[str, Any] = {"anon": self.anon}
        client_kwargs = {}
        if self.endpoint_url:
            client_kwargs["endpoint_url"] = self.endpoint_url
        if self.region:
            client_kwargs["region_name"] = self.region
        if client_kwargs:
            opts["client_kwargs"] = client_kwargs
        if self.profile:
            opts["profile"] = self.profile
        return opts


@dataclass(frozen=True)
class TissueConfig:
    """Foreground (tissue or smear) detection on a thumbnail; sizes in µm so they mean the same
    thing at any magnification.

    Attributes:
        thumbnail_mpp: µm per pixel of the thumbnail the mask is computed on.
        thumbnail_max_px: cap on the thumbnail's longer side (protects memory on huge slides).
        min_saturation: floor for the Otsu threshold on HSV saturation (0–1), so a blank slide
            does not turn its noise into "tissue".
        max_value: pixels brighter than this V (0–1) with low saturation are glass.
        closing_um: radius of the morphological closing that bridges small gaps.
        opening_um: radius of the opening that removes specks.
        min_area_um2: connected regions smaller than this are dropped.
        max_hole_um2: holes smaller than this are filled (larger ones, e.g. fat, stay out).
    """

    thumbnail_mpp: float = 8.0
    thumbnail_max_px: int = 4096
    min_saturation: float = 0.04
    max_value: float = 0.98
    closing_um: float = 16.0
    opening_um: float = 8.0
    min_area_um2: float = 1_000.0
    max_hole_um2: float = 2_000.0

    def __post_init__(self):
        if not (self.thumbnail_mpp > 0 and self.thumbnail_max_px >= 8):
            raise ConfigError("tissue.thumbnail_mpp must be positive and tissue.thumbnail_max_px"
                              f" at least 8, got {self.thumbnail_mpp} and {self.thumbnail_max_px}")
        for key in ("min_saturation", "max_value"):
            if not 0 <= getattr(self, key) <= 1:
                raise ConfigError(f"tissue.{key} is an HSV fraction from 0 to 1, got "
                                  f"{getattr(self, key)}")


@dataclass(frozen=True)
class TileConfig:
    """A tile grid at a physical resolution.

    Attributes:
        target_mpp: µm per pixel of the tiles handed to models.
        tile_px: tile side in pixels at ``target_mpp``.
        overlap_px: overlap between neighbouring tiles, in pixels at ``target_mpp``.
        min_tissue_fraction: tiles with less foreground than this are dropped.
        max_upsample: how much finer than the slide's own pixels ``target_mpp`` may be.
        fat_closing_um: for this grid only, faintly stained pixels (adipocyte membranes) closed
            with a disc of this radius join the tissue mask, so fat vacuoles inside marrow
            (unstained, up to about twice this across) count as tissue and fatty tiles are not
            dropped from the cellularity (0: off; ``tissue.with_enclosed_fat``).
    """

    target_mpp: float = 2.0
    tile_px: int = 224
    overlap_px: int = 0
    min_tissue_fraction: float = 0.5
    max_upsample: float = 1.25
    fat_closing_um: float = 0.0

    def __post_init__(self):
        if self.target_mpp <= 0 or self.tile_px <= 0:
            raise ConfigError(f"target_mpp and tile_px must be positive, got {self}")
        if not 0 <= self.overlap_px < self.tile_px:
            raise ConfigError(f"overlap_px must be in [0, tile_px), got {self.overlap_px}")


@dataclass(frozen=True)
class CellDetectionConfig:
    """Nucleated-cell detection on Romanowsky-stained smears; sizes in µm.

    Attributes:
        work_mpp: resolution the detector works at (coarser is faster; cells stay > 20 px).
        threshold_floor: lowest stain-score threshold a slide may get (score = blue - red, 0-255).
        threshold_ceiling: highest one (a slide full of nuclei must not push it into cytoplasm).
        merge_um: closing radius that joins the lobes of one nucleus (segmented neutrophils).
        min_cell_area_um2: smallest nucleated-cell nucleus; smaller purple objects are platelets.
        min_platelet_area_um2: smaller objects are noise.
        pale_platelet_ratio: on the slides of ``pale_platelet_specimens``, a pale platelet has
            only a few pixels above the slide's threshold, too few for
            ``min_platelet_area_um2``: around such a seed the pixels above this fraction of the
            threshold make the object (hysteresis), kept as a platelet when its area lies
            between ``pale_platelet_min_area_um2`` and ``min_cell_area_um2``.
            None: the threshold alone. On BCCD's 292 fields, platelet recall 0.34 -> 0.78.
        pale_platelet_seed_ratio: a pale platelet's seed is a pixel above this fraction of
            the threshold (1: above the threshold itself; at least ``pale_platelet_ratio``).
            The faintest platelets, on a red cell or in a pale film, have none above the
            threshold on the work grid. On BCCD's fields, 1 -> 0.8 finds 7 more of its 292
            boxed platelets (recall 0.781 -> 0.805) and 11 platelets it left unboxed (each
            seen: all 11 pale platelets, on or beside red cells); white-cell detection and the
            platelets found at the centre of 40 PBC platelet images (34) stay the same. On 240
            PBC images of white cells and erythroblasts it adds 8 objects: 3 platelets, 5 in a
            white cell's cytoplasm (0.02 per white cell, against 10-40 platelets per one). A
            lower extent cut instead (``pale_platelet_ratio`` 0.65) found more on BCCD (0.836)
            but grew PBC's larger platelets past ``min_cell_area_um2`` (34 -> 31 found).
        pale_platelet_min_area_um2: smaller pale objects are noise.
        pale_platelet_clearance_um: a pale object this near a nucleated cell's nucleus is left
            out (its cytoplasm or granules, not a platelet).
        pale_platelet_body_ratio: nor one in a nucleated cell's body: the pixels above this
            fraction of the threshold joined to its nucleus (cytoplasm scores above it, red
            cells and glass below). None: the clearance alone. On PBC's single-cell images it
            halves the pale objects taken in basophils', monocytes' and immature granulocytes'
            cytoplasm, at 0.4 points of BCCD platelet recall.
        pale_platelet_specimens: the specimen types (`engine.specimen`) whose slides get the
            pale-platelet pass: blood films, where a platelet estimate is read. Elsewhere its
            false objects outnumber the platelets: on CMU-1, an H&E section run untyped, 1,618
            platelet-sized objects become 7,434; marrow aspirates, whose cytoplasm is denser,
            are untested. These slides also get the pale nuclei and a white cell's nuclear
            parts joined (``nucleus_body_ratio``).
        pale_nucleus_specimens: those whose slides get the pale pass's nuclei alone
            (``pale_nucleus_min_area_um2``, ``pale_nucleus_lobe_gap_um``), without its
            platelets: marrow aspirates. On PBC's cells (0.1 µm/px, every third image of
            each class) at the threshold of a mix of classes (40.8), without them, 199 of 346
            monocytes are found, 263 of 313 eosinophils and 646 of 722 immature granulocytes
            (erythroblasts 379 of 387): a nucleus paler than the threshold is lost, and a
            slide's darker nuclei (lymphocytes, erythroblasts) set it, a bias against the
            myeloid and monocytic counts and the M:E ratio. With them 334, 305 and 709
            (erythroblasts 380); at 35, monocytes 282 -> 339; at 31, 318 -> 344. The objects
            at the platelet images' centres are the same at 40.8 and 31 (at 35 one of 324 is
            a nucleated object more). BCCD's fields detect as without them. Through the whole
            job, a crowded slide of 285 PBC cells typed aspirate, on PBC's glass colour
            (threshold 38.8): monocytes found 26 -> 40 of 40, `MO2` calls 27 -> 41, M:E 4.14
            -> 4.60, erythroblasts the same, no nucleated object away from a cell. It costs a
            detection process 14 % of its rate on the benchmarks' synthetic aspirate at 0.25
            µm/px (`DetectCells` over an 8192 px slide's 81 tiles: 5,803 -> 4,988 cells/s),
            4-5 % at 0.252, where resampling the tiles costs more (`feed_capacity.py`).
        pale_platelet_merge_um: a platelet's granules lie apart in its paler hyalomere, so the
            pass finds a large platelet as several objects: pale objects within twice this of
            each other are one platelet (one of 12 µm² or more is, as any object that size,
            ``nucleated``, for the classifier to call), and none where one is beside an object
            the threshold found (that platelet is counted already); distances are box to box.
            None: each object is a platelet. On 150 PBC platelet images (0.1 µm/px) the
            objects within 5 µm of the centre fall from 189 to 144 for the same 134 platelets
            found (images with two or more: 41 -> 10); BCCD platelet recall 0.791 -> 0.781,
            its detections 339 -> 334.
        pale_nucleus_min_area_um2: on the slides of ``pale_platelet_specimens`` and
            ``pale_nucleus_specimens``, a nucleus paler than the threshold (a monocyte's, on a
            film whose threshold its darker lymphocytes set) is only a few platelet-sized
            parts above it: a pale object of at least this area (and at most
            ``split_area_um2``) around such parts, clear of nucleated cells as a pale platelet
            is, is one nucleated object in their place. Platelets' pale extents are smaller
            (90 % under 25 µm² on PBC's), white cells' nuclei larger. None: off. On 40 PBC
            images each of six classes, at the threshold of their mix: monocytes found 24 ->
            36, eosinophils 33 -> 37, lymphocytes and basophils 38 -> 40, neutrophils and
            erythroblasts the same; BCCD unchanged.
        pale_nucleus_lobe_gap_um: on the same slides, a pale nucleus in lobes that lie apart
            (an eosinophil's, across red granules that score far below any cut) is, lobe by
            lobe, smaller than ``pale_nucleus_min_area_um2``, and its parts above the
            threshold were platelets. Seeded pale objects of ``min_cell_area_um2`` or more (a
            lobe), clear of nucleated cells as a pale nucleus is, within this distance of each
            other (pixel to pixel) and together at least ``pale_nucleus_min_area_um2`` (at
            most ``split_area_um2``), are one nucleated object, and so is a pale nucleus with
            such lobes (two pale nuclei are two cells); the smaller pale objects among them
            (the nucleus broken up at the pale cut) go with them. None: off. On PBC's 937
            eosinophils (0.1 µm/px) those found at the threshold of a mix of classes (40.8) go
            from 875 to 925, at 45 from 813 to 916, at 35 from 910 to 926, and the
            platelet-sized objects by them at 40.8 from 247 to 124. On its 972 platelet images
            nothing changes; on its other 8,075 white-cell and erythroblast images 12 more
            cells are found (4 neutrophils, 5 monocytes, 3 immature granulocytes) and 4 cells
            found as two nuclei are one. BCCD unchanged. 2 µm finds 7 fewer eosinophils at
            40.8, 4 µm 2 more.
        nucleus_body_ratio: on the same slides, a white cell's nucleus is at times found as
            platelet-sized parts above the threshold (a monocyte's folds, a basophil's nucleus
            under its granules, a neutrophil's lobe), each then a platelet. A cell's body is
            what joins above this fraction of the threshold (cytoplasm; red cells and glass
            score below it): such parts in a body with one nucleated object are part of it,
            and in a body with none they are one nucleus where together they reach
            ``min_cell_area_um2`` (`engine.cells._join_nucleus_parts`; after the pale pass, so a
            pale nucleus keeps its parts). None: off. On PBC's 8,075 white-cell and
            erythroblast images (0.1 µm/px, at their mix's threshold) the platelet-sized
            objects within 8 µm of the imaged cell fall from 1,392 to 787 (monocytes' 0.46 ->
            0.23 an image, immature granulocytes' 0.21 -> 0.12); in 40 of the changed images,
            looked at, every object left out lay in the white cell. The nucleated objects found
            at the images' centres rise from 7,971 to 7,993 (monocytes 1,023 -> 1,030,
            eosinophils 889 -> 897); the platelets found at the centre of its 972 platelet
            images fall by one (770 -> 769). Through the whole job on a blood slide of 300 PBC
            white cells and erythroblasts (0.25 µm/px): 117 -> 110 platelet-sized objects (each
            of the 7 in a white cell), the nucleated cells and the differential unchanged.
            The cost: a platelet touching a white cell is taken for part of it (BCCD: 2 of its
            292 boxed platelets, recall 0.805 -> 0.798). An eosinophil's lobes stay apart: its
            red granules score below the cut (pale ones: ``pale_nucleus_lobe_gap_um``).
        max_cell_area_um2: larger objects are clumps or smudges, not reported.
        split_area_um2: objects larger than this are split at distance-transform watersheds.
        split_min_distance_um: minimum distance between the centres of two split cells.
        max_blur_um: a cell whose crop's edges are blurred by more than this Gaussian sigma
            (`engine.focus`) is ``out_of_focus``; None: not measured. On held-out PBC cells
            the reference classifier's accuracy is 0.935 sharp, 0.78 at 0.25 µm and 0.51 at
            0.375 µm; a 40x scanner's in-focus optics give about 0.2.
    """

    work_mpp: float = 0.5
    threshold_floor: float = 25.0
    threshold_ceiling: float = 70.0
    merge_um: float = 1.5
    min_cell_area_um2: float = 12.0
    min_platelet_area_um2: float = 1.5
    pale_platelet_ratio: float | None = 0.7
    pale_platelet_seed_ratio: float = 0.8
    pale_platelet_min_area_um2: float = 1.0
    pale_platelet_clearance_um: float = 2.0
    pale_platelet_body_ratio: float | None = 0.35
    pale_platelet_specimens: tuple[str, ...] = ("blood",)
    pale_nucleus_specimens: tuple[str, ...] = ("blood", "aspirate")
    pale_platelet_merge_um: float | None = 0.5
    pale_nucleus_min_area_um2: float | None = 30.0
    pale_nucleus_lobe_gap_um: float | None = 3.0
    nucleus_body_ratio: float | None = 0.35
    max_cell_area_um2: float = 6000.0
    split_area_um2: float = 120.0
    split_min_distance_um: float = 5.0
    max_blur_um: float | None = 0.3

    def __post_init__(self):
        if not self.work_mpp > 0:
            raise ConfigError(f"cells.work_mpp must be positive (µm/px), got {self.work_mpp}")
        if not self.threshold_floor <= self.threshold_ceiling:
            raise ConfigError(f"cells.threshold_floor ({self.threshold_floor}) must not exceed "
                              f"cells.threshold_ceiling ({self.threshold_ceiling})")
        for key in ("pale_platelet_specimens", "pale_nucleus_specimens"):
            wrong = [s for s in getattr(self, key) if s not in SPECIMENS]
            if wrong:
                raise ConfigError(f"cells.{key}: {wrong} not specimen types; each one of "
                                  f"{sorted(SPECIMENS)}")
        if self.pale_nucleus_lobe_gap_um is not None and not self.pale_nucleus_lobe_gap_um > 0:
            raise ConfigError("cells.pale_nucleus_lobe_gap_um must be positive (µm) or null, "
                              f"got {self.pale_nucleus_lobe_gap_um}")
        if self.nucleus_body_ratio is not None and not 0 < self.nucleus_body_ratio < 1:
            raise ConfigError("cells.nucleus_body_ratio must lie between 0 and 1 (a fraction "
                              f"of the threshold) or be null, got {self.nucleus_body_ratio}")
        low = self.pale_platelet_ratio
        if low is not None and not low <= self.pale_platelet_seed_ratio <= 1:
            raise ConfigError("cells.pale_platelet_seed_ratio must lie between "
                              f"pale_platelet_ratio ({low}) and 1, got "
                              f"{self.pale_platelet_seed_ratio}")


NO_MODEL = "none"


@dataclass(frozen=True)
class ModelStageConfig:
    """A model stage of the pipeline: which registered model, its weights, and how it runs.

    Attributes:
        model: registry name (``python -c "import engine.models as m; print(m.list_models())"``);
            for the encoder, ``none`` turns tile embeddings off (the tiles are still read for
            the label-free cellularity), even where ``--allow-untrained`` would make some.
        checkpoint: safetensors URI; None means the model's shipped default, if any.
        ensemble: more checkpoints of ``model`` scoring the same class codes, for example the
            other folds of ``jobs.train_cell_classifier --folds K``; the classifier's
            probabilities are averaged over ``checkpoint`` and these (one forward pass each).
            Classifier only: embeddings of different models do not average.
        batch_size: crops or tiles per forward pass.
        passes_per_call: no longer used by ``process_slides`` (kept so that configs that set
            it still load; ``benchmarks/model_throughput.py`` times it). Until session 27 Ray
            Data handed a model actor ``batch_size`` x this many rows per call; re-batching the
            crops or tiles to a row count copied every one of them, so the model actors now
            take whole blocks as Arrow tables, read in place and run in passes of
            ``batch_size``, pipelined on a GPU (the host gathers and copies the next pass's
            pixels while the model runs this one; `engine.models.inference.Stacked`).
        calls_in_flight: Ray Data calls each model actor takes at once: while the model runs
            one (never two at a time), Ray Data fetches and formats the next batch and stores
            the last one's output, instead of leaving the GPU idle while it does.
        concurrency: model actors (one per GPU on a GPU cluster).
        num_gpus: GPUs per actor when the cluster has GPUs (0 on CPU-only clusters).
        host_cpus: CPUs left free for each model actor on a GPU, for its host work (picking
            the crops into pinned memory, launching the kernels, Ray Data formatting its
            batches): the CPU actors are that many fewer. With 0 they took every core: on a
            16-CPU H200 node the classifier then ran at 0.39 of its speed alone while fed,
            against 0.67 with the node to itself (2026-12-04). Less where the cluster has too
            few CPUs for it. They are held, with the actor's GPU share, by a placement group
            made before any actor starts, so that they lie on the GPU's node
            (`engine.pipeline.run.reserve_host_cpus`); with 0 the actor asks for no CPU.
        tta: average over 8 rotations/flips (classifier only; 8x compute).
        compile: ``torch.compile`` the model in its actors: about 2x for ResNeXt-50 on an
            H100; on a CPU-only node x1.3-1.4 for ResNeXt-50 in bf16 and float32 on 2 cores
            (weights frozen into the graph, one graph for every batch size;
            `engine.models.Predictor`). Each actor compiles at its start (15-30 s here),
            before its first batch. Not for an int8 checkpoint, which runs its own kernels.
        cuda_graphs: run each padded batch shape as a captured CUDA graph on GPU actors (one
            replay per pass instead of one launch per kernel; `engine.models.Predictor`),
            captured at actor start. For a node whose CPUs are busy feeding the GPU: the
            model's host work shrinks to a copy and a replay. Each shape keeps its own
            activation memory (``batch_size`` / 32 shapes; ViT-S/14 at 256 tiles about 1 GiB
            each). A shape whose graph cannot be captured, or whose first replay differs
            from the eager pass on the same batch, turns them off for the actor (a warning in
            its log) and the job runs eager. Not with ``compile``; ignored on CPUs. Not yet
            measured on a GPU.
        amp: bf16 autocast where the device runs bf16 natively: CUDA, and CPUs with AVX512-BF16
            or AMX (ResNeXt-50 2.1x faster than float32 on 2 cores). False: float32, for
            bit-stable figures across machines.
        threads: torch threads of an actor that runs the model on a CPU (0: the node's CPUs).
            Ray holds an actor of one CPU to one thread, which left an int8 classifier bounding
            a CPU-only node at half its speed.
        features: write each cell's penultimate features (ResNeXt-50: 2,048 float32, 8 KB a
            cell) to the ``cell_features`` table, for cell-level MIL (``jobs.train_mil
            --instances cells``) and clustering; an ensemble's are its ``checkpoint``'s.
            Classifier only (tile embeddings are always written).
        platelets: classify the platelet-sized detections too. False: only the nucleated ones
            go through the model (the differential counts nothing else), and a platelet's
            class columns are null in the cells table. On a blood film, with some 10-40
            platelets per white cell, most of the classifier's work is platelets. Classifier
            only.
    """

    model: str = "deepheme-resnext50"
    checkpoint: str | None = None
    ensemble: tuple[str, ...] = ()
    batch_size: int = 256
    passes_per_call: int = 4
    calls_in_flight: int = 2
    concurrency: int = 1
    num_gpus: float = 1.0
    host_cpus: float = 1.0
    tta: bool = False
    compile: bool = False
    cuda_graphs: bool = False
    amp: bool = True
    threads: int = 0
    features: bool = False
    platelets: bool = True

    def __post_init__(self):
        for key in ("batch_size", "passes_per_call", "calls_in_flight", "concurrency"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{key} must be at least 1, got {getattr(self, key)}")
        if self.host_cpus < 0:
            raise ConfigError(f"host_cpus must be at least 0, got {self.host_cpus}")


@dataclass(frozen=True)
class PipelineConfig:
    """How ``process_slides`` runs.

    Attributes:
        stages: ``cells`` (detection, classification, differential) and/or ``tiles`` (tile
            table, label-free cellularity, tile embeddings when an encoder has weights).
        slides_per_chunk: slides per pair of branch streams; 0 streams every pending slide at
            once, so model actors load once per run (memory is bounded by the slides in flight
            either way). A positive number restarts the actors for every chunk.
        max_slide_shards: at most this many ways to split one slide's tasks when the archive has
            fewer slides than twice the CPU actors, so that every actor gets work (each shard plans
            the slide again; 1: never split).
        cells_cpu_share: share of the CPU actors given to cell detection when both branches
            run (the rest read encoder tiles).
        read_batch_size: cell-detection tasks (1024 px regions, ~10 ms each) per batch on
            CPU workers: each batch is a block Ray Data schedules and the driver converts, so
            at a GPU classifier's rate (tens of thousands of cells/s) small batches cost the
            driver more than the cells do (16 against 4: x1.8 rows/s through Ray Data, half
            the driver's time per row; x1.09 end to end on 2 cores). The model actor pays per
            block too: 64 against 16 took its process (Ray Data alone, no model) from 14.0 to
            12.6 µs of CPU per crop and the driver's from 12.6 to 6.0, against the 19 µs an H200
            spends on a ResNeXt-50 crop; x1.22 end to end on 2 cores.
        tile_read_batch_size: encoder tiles (224 px at 2 µm/px, ~1 ms each to read and
            measure) per batch on CPU workers: large enough that Ray Data's per-batch cost
            does not dominate (64 against 16: x1.4-2.1 steady-state reading on 2 cores).
        read_concurrency: CPU actors of both branches together, detection and tile reading
            (None: as many as the cluster has CPUs, less one for the driver on a GPU node).
        read_threads: threads per read worker, for encoder tiles and for cell-detection
            regions (reads under way while a region is detected); 0 (auto): 4 where the slides
            are read straight from a network file system (NFS, SMB), each of whose reads waits
            on a round trip, else 1, since measuring tiles and detecting cells hold the GIL
            (`engine.pipeline.run.read_threads_for`).
        native_threads: threads OpenCV and libvips may use in each CPU actor (0: their default,
            one per core, which oversubscribes a node full of actors).
        stall_minutes: a run that commits no slide for this long says so, naming the reads
            under way longest (`engine.pipeline.run.StallReport`), again as long again
            after; 0: never.
        read_timeout_minutes: a slide's plan (its download from S3 not counted), or a batch
            of its tiles, that has not ended after this long is taken to hang (a decoder in a
            loop, a network mount that stopped answering): its process is ended, and the
            slide fails ``SlideReadTimeout`` (`engine.pipeline.steps.attempt`); 0: never (a
            hung read then holds the run until it is stopped). Needs ``crash_guard``. Three
            slides found to hang with no read ending between them stop the job: the storage
            has stopped answering (`engine.errors.HUNG_IN_A_ROW`).
        crash_guard: count the attempts at each slide's plan and each batch of reads
            (`engine.pipeline.steps.Attempts`, a round trip to an actor before each), so that a
            slide whose reading kills its process fails ``SlideCrashedReader`` after two
            deaths. False, only to measure what the count costs (``pipeline_e2e.py
            --baseline-set crash_guard=false``): Ray then retries such a slide for ever, and
            no read is timed out.
        direct_jpeg: decode the JPEG tiles of generic tiled TIFFs and Aperio SVS directly
            (`engine.slides.jpeg_tiles`) instead of through OpenSlide, each level checked
            against OpenSlide first, at about twice the speed: OpenSlide's pixels, except at
            fractional level positions, where the nearest level pixel's stand for OpenSlide's
            interpolation (so switching it changes results a little).
        min_nucleated: below this many nucleated cells (white cells on a blood smear) a
            differential is flagged.
        max_ood_percent: a slide with more than this share of its nucleated cells out of the
            classifier's training distribution (`engine.models.ood`; the checkpoint must carry
            a feature density) is flagged ``out_of_distribution``: its differential is not to
            be trusted before review.
        count_out_of_focus: count cells out of focus (``cells.max_blur_um``) in the
            differential; by default they are left out, as a technologist counts only where
            the cells are sharp (blurred cells are called erythroblasts), and reported.
        max_out_of_focus_percent: a slide with more than this share of its nucleated cells out
            of focus is flagged ``out_of_focus`` (rescan it, or review the cells it rests on).
        red_cell_diameter_um: the range, µm, of a slide's median red-cell diameter (its
            free-lying red cells in the tiles sampled for the stain threshold, measured at its
            µm/px: `engine.pixel_size.red_cell_size`) outside which it is flagged
            ``pixel_size``: its stated pixel size is likely wrong by a factor (or its red cells
            are abnormal), and cells were detected and classified at the wrong scale. Normal
            red cells are 6.2-8.2 µm; null: no check (the measure is still reported).
        max_stain_hue_deg: a slide whose nucleated cells' nuclei (their median colour,
            `engine.stain`) differ in hue by more than this many degrees from the classifier's
            training data (the checkpoint card's ``stain``) is flagged ``stain``: another lab's
            stain or scanner, on which the calls drift (on PBC's held-out split, hues turned
            20° cost the reference 0.02-0.03 of macro F1, and its feature density flags few of
            those cells). Null: no hue check.
        min_stain_saturation_ratio: the same where the nuclei's saturation falls below this
            share of the training data's (a paler stain: at 0.6, 0.03 of macro F1 lost).
            Null: no saturation check.
        lobe_merge_um: on a blood film, two nucleated detections called the same bilobed
            class (`engine.classes.LOBED_CODES`: eosinophil, basophil) with centres this near
            are one cell's lobes, counted once (``cells.lobe_of``): the detector finds 7-11 %
            of PBC's eosinophils as two nuclei, 6-9.8 µm apart, and two eosinophils side by
            side are rare on a film. Not on other slides, where cells crowd (an aspirate's);
            null: every detection is a cell.
        threshold_samples: tiles sampled per slide to set its stain threshold.
        cellularity_checkpoint: ABMIL regressor (``jobs.train_mil``) on the encoder's tile
            embeddings; K bags of up to ``cellularity_bag_size`` tiles give mean and sd.
    """

    stages: tuple[str, ...] = ("cells", "tiles")
    slides_per_chunk: int = 0
    max_slide_shards: int = 16
    cells_cpu_share: float = 0.5
    read_batch_size: int = 64
    tile_read_batch_size: int = 64
    read_concurrency: int | None = None
    read_threads: int = 0
    native_threads: int = 1
    crash_guard: bool = True
    stall_minutes: float = 10.0
    read_timeout_minutes: float = 30.0
    direct_jpeg: bool = True
    min_nucleated: int = 200
    max_ood_percent: float = 20.0
    count_out_of_focus: bool = False
    max_out_of_focus_percent: float = 20.0
    red_cell_diameter_um: tuple[float, float] | None = (5.0, 10.5)
    max_stain_hue_deg: float | None = 10.0
    min_stain_saturation_ratio: float | None = 0.75
    lobe_merge_um: float | None = 10.0
    threshold_samples: int = 12
    classifier: ModelStageConfig = field(default_factory=ModelStageConfig)
    encoder: ModelStageConfig = field(default_factory=lambda: ModelStageConfig(
        model="dinov2-vits14", batch_size=128))
    cellularity_checkpoint: str | None = None  # ABMIL regressor from jobs.train_mil
    cellularity_bags: int = 10
    cellularity_bag_size: int = 256

    def __post_init__(self):
        if not self.stages or not set(self.stages) <= {"cells", "tiles"}:
            raise ConfigError(f"pipeline.stages must name one or both of cells, tiles; got "
                              f"{list(self.stages)}")
        for key in ("read_batch_size", "tile_read_batch_size", "threshold_samples",
                    "cellularity_bags", "cellularity_bag_size"):
            if getattr(self, key) < 1:
                raise ConfigError(f"pipeline.{key} must be at least 1, got {getattr(self, key)}")
        if self.read_threads < 0:
            raise ConfigError(f"pipeline.read_threads must be 0 (auto) or more, got "
                              f"{self.read_threads}")
        for key in ("stall_minutes", "read_timeout_minutes"):
            if getattr(self, key) < 0:
                raise ConfigError(f"pipeline.{key} must be 0 (never) or more, got "
                                  f"{getattr(self, key)}")
        r = self.red_cell_diameter_um
        if r is not None and (len(r) != 2 or not 0 < r[0] < r[1]):
            raise ConfigError(f"red_cell_diameter_um must be [low, high] with 0 < low < high "
                              f"(µm) or null, got {list(r)}")
        if self.max_stain_hue_deg is not None and not 0 < self.max_stain_hue_deg <= 180:
            raise ConfigError(f"max_stain_hue_deg must be degrees in (0, 180] or null, got "
                              f"{self.max_stain_hue_deg}")
        r = self.min_stain_saturation_ratio
        if r is not None and not 0 < r <= 1:
            raise ConfigError(f"min_stain_saturation_ratio must be a share in (0, 1] or null, "
                              f"got {r}")
        if self.lobe_merge_um is not None and not self.lobe_merge_um > 0:
            raise ConfigError(f"lobe_merge_um must be a distance > 0 (µm) or null, got "
                              f"{self.lobe_merge_um}")


# Keys that decide how a run goes, not what it finds: a rerun into the same output may change
# them freely (`Config.result_changes`). A key names itself and everything below it.
EXECUTION_KEYS = frozenset({
    "storage", "pipeline.slides_per_chunk", "pipeline.max_slide_shards",
    "pipeline.cells_cpu_share", "pipeline.read_batch_size", "pipeline.tile_read_batch_size",
    "pipeline.read_concurrency",
    "pipeline.read_threads", "pipeline.native_threads", "pipeline.crash_guard",
    "pipeline.stall_minutes", "pipeline.read_timeout_minutes",
    *(f"pipeline.{stage}.{key}" for stage in ("classifier", "encoder")
      for key in ("batch_size", "passes_per_call", "calls_in_flight", "concurrency",
                  "num_gpus", "compile", "cuda_graphs", "threads")),
})


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flatten(value, path + "."))
        else:
            out[path] = list(value) if isinstance(value, tuple) else value
    return out


def _is_execution_key(path: str) -> bool:
    return any(path == k or path.startswith(k + ".") for k in EXECUTION_KEYS)


@dataclass(frozen=True)
class Config:
    """Everything a job needs, resolved; written next to the outputs as ``config.json``."""

    storage: StorageConfig = field(default_factory=StorageConfig)
    tissue: TissueConfig = field(default_factory=TissueConfig)
    # Biopsy tiles for the tile encoder / cellularity (ARUP method: 224 px at 2.0 µm/px).
    tiles: TileConfig = field(default_factory=lambda: TileConfig(fat_closing_um=60.0))
    # Aspirate / smear tiles for cell detection and classification (DeepHeme works at 0.25 µm/px).
    cell_tiles: TileConfig = field(
        default_factory=lambda: TileConfig(target_mpp=0.25, tile_px=1024, overlap_px=96,
                                           min_tissue_fraction=0.05, max_upsample=2.5))
    cells: CellDetectionConfig = field(default_factory=CellDetectionConfig)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> Config:
        return from_dict(cls, data or {})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> Config:
        return dataclasses.replace(self, **changes)

    def result_changes(self, previous: dict[str, Any]) -> list[str]:
        """What this config changes against ``previous`` (another config's `to_dict`, as an
        output's ``config.json`` holds it) in keys that change a run's results, as
        ``"key: old -> new"``; keys of `EXECUTION_KEYS` are left out, and a key either side
        lacks takes its default."""
        try:
            before = _flatten(Config.from_dict(previous).to_dict())
        except ConfigError as err:
            return [f"the earlier config is not one this version reads ({err})"]
        now = _flatten(self.to_dict())
        return [f"{k}: {before[k]!r} -> {now[k]!r}" for k in sorted(now)
                if not _is_execution_key(k) and before.get(k) != now[k]]

    def hash(self) -> str:
        """Short stable hash of the resolved config (recorded in every status row)."""
        blob = json.dumps(self.to_dict(), sort_keys=True, default=str).encode()
        return hashlib.sha256(blob).hexdigest()[:12]


def _parses_as_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _typed(value: Any, hint: Any, where: str) -> Any:
    """``value`` checked against a config field's type (lists become tuples).

    Every number in the config is a size, a distance, a count, a share or a limit: negative
    numbers, NaN and infinity are refused with the rest, as a value of the wrong kind is.

    Raises:
        ConfigError: naming the key, what it takes and what it got.
    """
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (types.UnionType, typing.Union):  # ``X | None``
        if value is None and type(None) in args:
            return None
        return _typed(value, next(a for a in args if a is not type(None)), where)
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
    elif hint in (int, float):
        if isinstance(value, bool) or not isinstance(value, int if hint is int else (int, float)):
            text = " (YAML reads a number such as 1e-3, with no point, as text: write 1.0e-3)" \
                if isinstance(value, str) and _parses_as_number(value) else ""
            raise ConfigError(f"{where}: expected {'a whole number' if hint is int else 'a number'}"
                              f", got {value!r}{text}")
        if not (math.isfinite(value) and value >= 0):
            raise ConfigError(f"{where}: expected a number of 0 or more, got {value!r}")
    elif hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected text, got {value!r}")
    elif typing.get_origin(hint) is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        each = [args[0]] * len(value) if args[-1] is Ellipsis else args
        if len(each) != len(value):
            raise ConfigError(f"{where}: expected a list of {len(each)}, got {list(value)}")
        return tuple(_typed(v, h, f"{where}[{i}]") for i, (v, h) in enumerate(zip(value, each)))
    return value


def from_dict(cls: type[T], data: dict[str, Any], path: str = "") -> T:
    """Build dataclass ``cls`` from a plain dict, recursing into nested dataclasses.

    Raises:
        ConfigError: for an unknown key (listing the valid ones), a secret-looking key, or a value
            of the wrong shape.
    """
    if not isinstance(data, dict):
        raise ConfigError(f"{path or cls.__name__}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        where = f"{path}.{key}" if path else key
        if key.lower() in _SECRET_KEYS:
            raise ConfigError(f"{where}: credentials do not belong in a config file; set them in "
                              "the environment (AWS_ACCESS_KEY_ID, …) or an AWS profile")
        if key not in names:
            raise ConfigError(f"unknown config key {where!r}; valid keys here: {sorted(names)}")
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            value = from_dict(hint, value, where)
        else:
            value = _typed(value, hint, where)
        kwargs[key] = value
    try:
        return cls(**kwargs)
    except TypeError as err:
        raise ConfigError(f"{path or cls.__name__}: {err}") from err
