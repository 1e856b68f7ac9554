"""Batch inference: ``uint8 (B, H, W, 3)`` numpy in, float numpy out.

The model runs in channels_last with bf16 autocast on CUDA and on CPUs with native bf16
(AVX512-BF16 or AMX: ResNeXt-50 at 96 px 2.1x faster than float32 on 2 cores), else in float32;
a model loaded from an int8 checkpoint (`engine.models.quantize`) runs its body in int8 on CPU.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator

import numpy as np
import torch
import torch.nn.functional as F

from engine.models.factory import LoadedModel


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def native_bf16(device: torch.device | str) -> bool:
    """Whether ``device`` runs bf16 matmuls and convolutions natively (CUDA; CPUs with
    AVX512-BF16 or AMX through oneDNN). Elsewhere bf16 autocast would be emulated, and slower."""
    device = torch.device(device)
    if device.type == "cuda":
        return True
    return device.type == "cpu" and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


class Predictor:
    """Runs a `LoadedModel` on batches of RGB crops or tiles.

    A call may hold any number of rows: they go through the model ``chunk`` rows at a time.
    On CUDA the chunks are pipelined: each is gathered into a pinned host buffer (two, used in
    turn) and copied to the device on a copy stream while the model runs the one before, and
    the outputs come back to the host once per call, so the GPU does not wait on the host
    between chunks.

    Args:
        model: from `create_model`.
        device: defaults to CUDA when present.
        amp: bf16 autocast where the device runs bf16 natively (`native_bf16`).
        channels_last: NHWC memory format on CUDA and under bf16 on CPU (faster convolutions).
        compile: ``torch.compile`` the model (measured on an H100: ResNeXt-50 26.5k -> 62k
            crops/s; the first batches, or `warmup`, pay the compile time). On a CPU, Inductor
            folds the weights in as constants (``freezing``: convolutions prepacked for
            oneDNN) and compiles one graph for every batch size (the batch dimension
            dynamic; batches of fewer than 2 rows are padded to 2, sizes a dynamic graph
            does not cover): ResNeXt-50 x1.3-1.4 in bf16 and float32 on 2 cores, after 15-30 s
            of compiling (an int8 checkpoint, never compiled, is faster still there).
        bucket: on CUDA, batches are padded on the device to a multiple of this many rows, so
            the convolution plans (and compiled graphs) built for a few shapes serve every
            batch; without it each new batch size builds its own. 0 turns padding off.
        chunk: rows per forward pass.
        graphs: on CUDA with ``bucket``, run each padded batch shape as a captured CUDA graph
            (`torch.cuda.CUDAGraph`): one replay instead of the model's kernel launches one
            by one (ResNeXt-50: about 250 a pass), so a host whose CPUs are busy feeding it
            holds the GPU back less. Each shape is captured on its first batch (`warmup`
            captures them all), with the preprocessing, in its own memory pool. Not with
            ``compile`` (which has its own, ``mode="reduce-overhead"``), an int8 model or on
            a CPU, where it is ignored.
    """

    def __init__(self, model: LoadedModel, device: torch.device | str | None = None,
                 amp: bool = True, channels_last: bool = True, compile: bool = False,
                 bucket: int = 32, chunk: int = 256, graphs: bool = False):
        self.model = model
        if model.int8 is not None:  # int8 kernels are the CPU's
            if device is not None and torch.device(device).type != "cpu":
                raise ValueError(f"{model.weights} is an int8 checkpoint for CPUs; give its "
                                 "float checkpoint for a GPU")
            device, amp, channels_last, compile = "cpu", False, False, False
        self.device = torch.device(device) if device is not None else default_device()
        self.cuda = self.device.type == "cuda"
        self.amp = amp and native_bf16(self.device)
        self.channels_last = channels_last and (self.cuda or self.amp)
        self.module = model.module.to(self.device).eval()
        if self.channels_last:
            self.module = self.module.to(memory_format=torch.channels_last)
        self.compiled = compile and self.device.type in ("cuda", "cpu")
        if self.compiled and not self.cuda:
            from torch._inductor import config as inductor

            inductor.freezing = True  # this process's CPU graphs: inference only
        how = {} if self.cuda else {"dynamic": True}
        self.forward = torch.compile(self.module, **how) if self.compiled else self.module
        self.pooled = torch.compile(self._pooled, **how) if self.compiled else self._pooled
        if model.int8 is not None:
            self.pooled = model.int8
            self.forward = self._int8_logits
        self.density = model.ood.to(self.device) if model.ood is not None else None
        self.bucket = bucket if self.cuda else 0
        self.min_rows = 2 if self.compiled and not self.cuda else 0  # `preprocess`
        if chunk < 1:
            raise ValueError(f"chunk must be at least 1 row, got {chunk}")
        self.chunk = chunk
        self.mean = torch.tensor(model.mean, device=self.device).view(1, 3, 1, 1) * 255
        self.std = torch.tensor(model.std, device=self.device).view(1, 3, 1, 1) * 255
        self._copy_stream = torch.cuda.Stream(self.device) if self.cuda else None
        self._staging: list[tuple[torch.Tensor, torch.cuda.Event]] = []
        self.graphs = graphs and self.cuda and bool(self.bucket) and not compile \
            and model.int8 is None
        # (path, padded input shape) -> (graph, its uint8 input, its outputs)
        self._graphed: dict[tuple, tuple[torch.cuda.CUDAGraph, torch.Tensor, tuple]] = {}
        self.graphs_error = ""  # why graphs were turned off, where they were
        self.compile_error = ""  # why a CPU's compile was given up, where it was

    def warmup(self, max_batch: int, tta: bool = False, features: bool = False) -> None:
        """Run every padded batch shape up to ``max_batch`` once (CUDA, and a compiled model
        on a CPU), so the first real batches do not pay for kernel loading and convolution
        planning (nor, with ``graphs``, for capturing them; nor for compiling). A classifier
        runs the path `score` will take with ``tta`` and ``features``, as the pipeline's
        actor calls it. On a CPU, one batch: its one graph serves every size. A CPU's compile
        that fails (a node without a C++ compiler, which Inductor needs there) leaves the
        model eager, with a warning that says why (``compile_error``)."""
        if not (self.cuda or self.compiled):
            return
        px = self.model.spec.input_px
        step = self.bucket or max(max_batch, self.min_rows)
        run = self.embed if self.model.spec.task != "classification" else \
            (lambda x: self.score(x, tta, features=features))
        try:
            for n in range(step, max(min(max_batch, self.chunk), step) + 1, step):
                run(np.zeros((n, px, px, 3), np.uint8))
        except Exception as err:  # noqa: BLE001 - Inductor's own errors; re-raised on a GPU
            if self.cuda:
                raise
            self.compile_error = f"{type(err).__name__}: {str(err).strip()[:500]}"
            self.compiled, self.forward, self.pooled = False, self.module, self._pooled
            self.min_rows = 0
            warnings.warn(f"compile off for {self.model.spec.name} on the CPU: "
                          f"{self.compile_error}; running eager", RuntimeWarning)
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def preprocess(self, images: np.ndarray | torch.Tensor) -> torch.Tensor:
        """``(B, H, W, 3) uint8`` -> normalised ``(B', 3, S, S) float32`` on the device; ``B'``
        is ``B`` padded up to the bucket, or to ``min_rows`` (callers keep the first ``B``
        outputs).

        Inputs of another size are resized to the model's ``input_px`` (bilinear, antialiased).
        """
        x = torch.as_tensor(_checked(images))
        x = x.to(self.device, non_blocking=True)
        rows = max(-(-len(x) // self.bucket) * self.bucket if self.bucket else len(x),
                   self.min_rows)
        if rows > len(x):
            x = torch.cat([x, x.new_zeros((rows - len(x), *x.shape[1:]))])
        x = x.permute(0, 3, 1, 2).float()
        size = self.model.spec.input_px
        if x.shape[-2:] != (size, size):
            x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True,
                              align_corners=False)
        x = (x - self.mean) / self.std
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def chunks(self, images: np.ndarray, rows: np.ndarray | None = None
               ) -> Iterator[torch.Tensor]:
        """``images`` (or its ``rows``, in that order) as ``uint8 (b, H, W, 3)`` tensors of at
        most ``chunk`` rows on the device; at least one, empty for no rows.

        On CUDA each chunk is gathered into one of two pinned buffers and copied on a side
        stream, which the current stream waits for; a buffer is written again only once its
        last copy has left it. So the host gathers chunk k + 1 while the GPU runs chunk k.
        """
        images = _checked(images)
        n = len(images) if rows is None else len(rows)
        for k, start in enumerate(range(0, max(n, 1), self.chunk)):
            stop = min(start + self.chunk, n)
            picked = slice(start, stop) if rows is None else rows[start:stop]
            if not self.cuda or isinstance(images, torch.Tensor):
                x = images[picked]  # torch refuses to wrap read-only arrays (Ray Data's)
                yield x if isinstance(x, torch.Tensor) else torch.from_numpy(
                    x if x.flags.writeable else x.copy())
                continue
            buffer, copied = self._buffer(k % 2, images.shape[1:])
            copied.synchronize()  # its previous chunk is on the device
            host = buffer[:stop - start]
            if isinstance(images, Stacked):
                images.gather(picked, host.numpy())
            elif rows is None:
                np.copyto(host.numpy(), images[picked])
            else:
                # mode "clip" writes straight into ``out`` ("raise" buffers a copy)
                np.take(images, picked, axis=0, out=host.numpy(), mode="clip")
            with torch.cuda.stream(self._copy_stream):
                x = host.to(self.device, non_blocking=True)
                copied.record(self._copy_stream)
            current = torch.cuda.current_stream(self.device)
            current.wait_stream(self._copy_stream)
            x.record_stream(current)  # the allocator keeps x until the model has read it
            yield x

    def _buffer(self, i: int, shape: tuple) -> tuple[torch.Tensor, torch.cuda.Event]:
        """Pinned staging buffer ``i`` (of two) for rows of ``shape``, and the event its last
        copy to the device recorded."""
        if not self._staging or self._staging[0][0].shape[1:] != shape:
            for _, copied in self._staging:
                copied.synchronize()
            self._staging = [(torch.empty((self.chunk, *shape), dtype=torch.uint8).pin_memory(),
                              torch.cuda.Event()) for _ in range(2)]
        return self._staging[i]

    def _map(self, images, run, rows=None, path: tuple = ()) -> tuple[torch.Tensor, ...]:
        """``run(x, b)`` on each preprocessed chunk ``x`` of ``b`` rows (`chunks`); its
        tensors concatenated along the rows (dimension ``-2``), still on the device. With
        ``graphs``, ``path`` names what ``run`` computes (the same for every call that gives
        it), and each chunk replays that path's graph for its padded shape."""
        outs = []
        for x in self.chunks(images, rows):
            graphed = self._replay(path, run, x) if self.graphs and path and len(x) else None
            outs.append(graphed if graphed is not None else run(self.preprocess(x), len(x)))
        return tuple(torch.cat(parts, dim=-2) for parts in zip(*outs))

    def _replay(self, path: tuple, run, x: torch.Tensor) -> tuple[torch.Tensor, ...] | None:
        """`_map`'s ``run`` on the device chunk ``x`` as a CUDA graph: ``x`` copied into the
        graph's input (padded with zeros to the bucket), one replay, and the outputs' first
        ``len(x)`` rows copied out (the next replay overwrites them). None, and ``graphs``
        off from then on (with a warning), where a shape's graph could not be captured or
        its first replay did not give the eager pass's outputs."""
        b = len(x)
        shape = (-(-b // self.bucket) * self.bucket, *x.shape[1:])
        if (path, shape) not in self._graphed:
            try:
                self._graphed[path, shape] = self._capture(run, shape)
            except RuntimeError as err:
                self.graphs, self.graphs_error = False, f"{path} {shape}: {err}"
                warnings.warn(f"CUDA graphs off for {self.model.spec.name}: "
                              f"{self.graphs_error}; running eager", RuntimeWarning)
                return None
        graph, static_in, static_out = self._graphed[path, shape]
        static_in[:b].copy_(x)
        static_in[b:].zero_()
        graph.replay()
        return tuple(o[..., :b, :].clone() for o in static_out)

    def _capture(self, run, shape: tuple) -> tuple[torch.cuda.CUDAGraph, torch.Tensor, tuple]:
        """A CUDA graph of ``run`` on a ``uint8`` input of ``shape``, preprocessing included,
        after two passes outside it on a side stream (cuDNN plans, lazy initialisation:
        nothing a graph may capture). The graph is replayed once on the input those passes
        saw, a seeded random batch, and must give their outputs; RuntimeError if not."""
        gen = torch.Generator(device=self.device).manual_seed(0)
        static_in = torch.randint(0, 256, shape, dtype=torch.uint8, device=self.device,
                                  generator=gen)
        current = torch.cuda.current_stream(self.device)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(current)
        with torch.cuda.stream(side):
            for _ in range(2):
                eager = run(self.preprocess(static_in), shape[0])
        current.wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # thread_local: a Ray actor's other threads (fetching and storing its batches) make no
        # CUDA calls, and must not fail the capture if a library of theirs ever does
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            static_out = run(self.preprocess(static_in), shape[0])
        graph.replay()
        for got, want in zip(static_out, eager):
            if not torch.allclose(got.float(), want.float(), rtol=1e-2, atol=1e-2):
                worst = float((got.float() - want.float()).abs().max())
                raise RuntimeError(f"the graph's replay differs from the eager pass by up to "
                                   f"{worst:.3g}")
        return graph, static_in, static_out

    def _autocast(self):
        # a graph must not keep autocast's cached bf16 weights: the cache is freed when the
        # autocast region ends, and the graph would read freed memory (PyTorch's CUDA graph
        # notes); without the cache the casts are part of the graph
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp,
                              cache_enabled=not self.graphs)

    @staticmethod
    def _views(x: torch.Tensor, tta: bool) -> list[torch.Tensor]:
        """The batch alone, or with ``tta`` its 8 rotations/flips (the batch itself first)."""
        return [x] if not tta else [torch.rot90(v, k, dims=(2, 3)) for v in (x, x.flip(3))
                                    for k in range(4)]

    @torch.inference_mode()
    def view_logits(self, images, tta: bool = False, rows=None) -> torch.Tensor:
        """Logits ``(V, B, C) float32`` of each view: the crop alone, or with ``tta`` its 8
        rotations/flips."""
        def run(x, b):
            return (torch.stack([self.forward(v)[:b].float() for v in self._views(x, tta)]),)

        with self._autocast():
            return self._map(images, run, rows, path=("views", tta))[0]

    def _classifier(self) -> None:
        if self.model.spec.task != "classification":
            raise ValueError(f"{self.model.spec.name} is an encoder; use embed()")

    @torch.inference_mode()
    def predict(self, images, tta: bool = False, rows=None) -> np.ndarray:
        """Class probabilities ``(B, C) float32`` in ``model.class_codes`` order, of
        ``images`` or of its ``rows`` (indices, in that order).

        With ``tta`` the softmax is averaged over the 8 rotations/flips of each crop (a cell has
        no preferred orientation); 8x the compute.
        """
        self._classifier()
        return torch.softmax(self.view_logits(images, tta, rows), dim=2).mean(0).cpu().numpy()

    def predict_with_distance(self, images, tta: bool = False, rows=None
                              ) -> tuple[np.ndarray, np.ndarray | None]:
        """`predict`'s probabilities and each crop's distance to the training data
        (`engine.models.ood`; ``(B,) float32``, None when the checkpoint carries no density),
        from the same forward pass (`score`)."""
        return self.score(images, tta, rows)[:2]

    @torch.inference_mode()
    def score(self, images, tta: bool = False, rows=None, features: bool = False
              ) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
        """`predict`'s probabilities, each crop's distance to the training data (None when the
        checkpoint carries no density) and, with ``features``, its pooled penultimate
        features ``(B, D) float32`` (else None), from one forward pass: features of each
        view, then the classifier's head. Distance and features are the crop's own view's."""
        density = self.density
        if density is None and not features:
            return self.predict(images, tta, rows), None, None
        self._classifier()
        head = self.module.get_classifier()

        def run(x, b):
            feats = [self.pooled(v)[:b] for v in self._views(x, tta)]
            logits = torch.stack([head(f).float() for f in feats])
            out = [torch.softmax(logits, dim=2).mean(0)]
            with torch.autocast(self.device.type, enabled=False):  # the density in float32
                if density is not None:
                    out.append(density.distance(feats[0])[:, None])
            if features:
                out.append(feats[0].float())
            return tuple(out)

        with self._autocast():
            outs = list(self._map(images, run, rows, path=("score", tta, features)))
        # one copy back per call, after every chunk was queued
        probs = outs.pop(0).cpu().numpy()
        distance = outs.pop(0)[:, 0].float().cpu().numpy() if density is not None else None
        return probs, distance, outs.pop(0).cpu().numpy() if features else None

    @torch.inference_mode()
    def embed(self, images, rows=None) -> np.ndarray:
        """Pooled features ``(B, D) float32`` (the penultimate layer of a classifier)."""
        with self._autocast():
            pooled = self._map(images, lambda x, b: (self.pooled(x)[:b].float(),), rows,
                               path=("embed",))[0]
        return pooled.cpu().numpy()

    def _int8_logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.module.get_classifier()(self.model.int8(x))  # the head stays float32

    def _pooled(self, x: torch.Tensor) -> torch.Tensor:
        return self.module.forward_head(self.module.forward_features(x), pre_logits=True)


class Stacked:
    """Arrays of rows of one shape, read as if they were one ``(B, H, W, 3)`` array without
    joining them: the chunks of a Ray Data block's tensor column, read in place. A `Predictor`
    gathers each pass's rows from them straight into its host buffer."""

    def __init__(self, parts):
        self.parts = [p for p in parts if len(p)] or list(parts[:1])
        if not self.parts or any(p.shape[1:] != self.parts[0].shape[1:] or p.dtype !=
                                 self.parts[0].dtype for p in self.parts):
            raise ValueError("Stacked needs at least one array, all of one row shape and dtype")
        self.offsets = np.cumsum([0] + [len(p) for p in self.parts])
        self.shape = (int(self.offsets[-1]), *self.parts[0].shape[1:])
        self.ndim, self.dtype = len(self.shape), self.parts[0].dtype

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, picked) -> np.ndarray:
        """Rows ``picked`` (a slice with a step of 1, or indices) as a new array."""
        n = len(range(*picked.indices(len(self)))) if isinstance(picked, slice) else len(picked)
        out = np.empty((n, *self.shape[1:]), self.dtype)
        self.gather(picked, out)
        return out

    def gather(self, picked, out: np.ndarray) -> None:
        """Copy rows ``picked`` (a slice with a step of 1, or indices in any order) into
        ``out``, in that order."""
        if isinstance(picked, slice):
            start, stop, _ = picked.indices(len(self))
            pos = 0
            for k, part in enumerate(self.parts):
                lo, hi = max(start, self.offsets[k]), min(stop, self.offsets[k + 1])
                if lo < hi:
                    np.copyto(out[pos:pos + hi - lo], part[lo - self.offsets[k]:
                                                           hi - self.offsets[k]])
                    pos += hi - lo
            return
        idx = np.asarray(picked, np.int64)
        which = np.searchsorted(self.offsets, idx, side="right") - 1
        for k in np.unique(which):
            at = np.flatnonzero(which == k)
            local = idx[at] - self.offsets[k]
            if at[-1] - at[0] + 1 == len(at):  # one run of ``out``'s rows (ascending indices)
                np.take(self.parts[k], local, axis=0, out=out[at[0]:at[-1] + 1], mode="clip")
            else:
                out[at] = self.parts[k][local]


def _checked(images):
    """``images`` unchanged when it is ``(B, H, W, 3) uint8`` (numpy or torch), else
    ValueError."""
    if images.ndim != 4 or images.shape[-1] != 3 or str(images.dtype) not in ("uint8",
                                                                            "torch.uint8"):
        raise ValueError(f"expected (B, H, W, 3) uint8, got {tuple(images.shape)} "
                         f"{images.dtype}")
    return images


class EnsemblePredictor:
    """Class probabilities averaged over classifiers that score the same codes in the same
    order (the k fold models of a cross-validated training run); one forward pass per member.

    ``model`` is the first member (its spec, codes and card stand for the ensemble); keyword
    arguments go to each member's `Predictor`.
    """

    def __init__(self, models: list[LoadedModel], device: torch.device | str | None = None,
                 **kwargs):
        self.check(models)
        self.model = models[0]
        self.members = [Predictor(m, device, **kwargs) for m in models]

    @staticmethod
    def check(models: list[LoadedModel]) -> None:
        """Raise ValueError unless ``models`` are one registered model scoring the same codes in
        the same order (cheap: the driver checks a configured ensemble before a run starts)."""
        if not models:
            raise ValueError("an ensemble needs at least one model")
        first = models[0]
        for m in models[1:]:
            if m.spec.name != first.spec.name or m.class_codes != first.class_codes:
                raise ValueError(
                    f"ensemble members must be one model scoring the same codes in the same "
                    f"order: {first.weights} is {first.spec.name} {list(first.class_codes)}, "
                    f"{m.weights} is {m.spec.name} {list(m.class_codes)}")

    def __len__(self) -> int:
        return len(self.members)

    def warmup(self, max_batch: int, tta: bool = False, features: bool = False) -> None:
        for i, p in enumerate(self.members):
            p.warmup(max_batch, tta, features and i == 0)

    def predict(self, images, tta: bool = False, rows=None) -> np.ndarray:
        """Mean class probabilities ``(B, C) float32`` over the members."""
        out = self.members[0].predict(images, tta, rows)
        for p in self.members[1:]:
            out += p.predict(images, tta, rows)
        return out / len(self.members)

    @property
    def ood(self):
        """The first member's training-data density (`engine.models.ood`), or None."""
        return next((p.model.ood for p in self.members if p.model.ood is not None), None)

    def predict_with_distance(self, images, tta: bool = False, rows=None
                              ) -> tuple[np.ndarray, np.ndarray | None]:
        """Mean probabilities, and the distance to the training data from the first member
        whose checkpoint carries a density (None if none does)."""
        return self.score(images, tta, rows)[:2]

    def score(self, images, tta: bool = False, rows=None, features: bool = False
              ) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
        """`predict_with_distance`'s two, and with ``features`` the first member's pooled
        features (the checkpoint's; members' features do not average), from its pass."""
        n = len(images) if rows is None else len(rows)
        out, distance = np.zeros((n, len(self.model.class_codes)), np.float32), None
        feats = None
        for i, p in enumerate(self.members):
            wants = features and i == 0
            if (distance is None and p.model.ood is not None) or wants:
                probs, d, f = p.score(images, tta, rows, features=wants)
                distance = d if distance is None else distance
                feats = f if wants else feats
            else:
                probs = p.predict(images, tta, rows)
            out += probs
        return out / len(self.members), distance, feats
