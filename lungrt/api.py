"""The Python API: one object for every kind of model file, as in Ultralytics' `YOLO(...)`.

    import lungrt
    seg = lungrt.LungSegmenter.load("msag-unet")           # shipped name, checkpoint, run folder,
    r = seg.predict("chest.png")                           # ONNX variant or TensorRT engine
    r.mask.shape, r.right_lung_px, r.left_lung_mm2
    r.save("out/")                                         # chest.mask.png (+ overlay)
    seg.predict(np_array), seg.predict(["a.png", "b.dcm"]), seg.predict("folder/")
    seg.export("onnx", precision="int8", calib="data/")    # -> Path
    seg.export("engine", precision="fp16")                 # TensorRT(-RTX) engine -> Path

The CLI is a thin layer over the same library functions. Nothing here writes into the current
folder: derived files go to the cache (`LUNGRT_CACHE`, default ~/.cache/lungrt) unless told.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from lungrt.build.resolve import open_runner
from lungrt.core.defaults import DEFAULT_MODEL
from lungrt.core.errors import LungrtError
from lungrt.backends.base import Runner
from lungrt.data.io import array_xray  # noqa: F401  (public: lungrt.api.array_xray)
from lungrt.inference.inputs import Item, collect_inputs
from lungrt.inference.measure import Measured, measure
from lungrt.inference.qc import features_many, thresholds_of
from lungrt.inference.stream import Frame, batch_shape, read_window, segment, stacked, thread_reader

PathLike = str | Path


@dataclass
class LungResult:
    """One X-ray's segmentation, at the X-ray's original size."""

    mask: np.ndarray  # bool (H, W)
    measured: Measured = field(repr=False)  # the network-size probabilities and what was measured on them
    right_lung_px: int | None  # the patient's right lung (the image's left side in a PA view); None when the
    left_lung_px: int | None  # DICOM header says it is not a frontal chest film (qc names why)
    lung_fraction: float
    mean_confidence: float
    right_lung_mm2: float | None = None  # when the file gives the pixel spacing (DICOM)
    left_lung_mm2: float | None = None
    path: str | None = None
    image: np.ndarray | None = field(default=None, repr=False)  # uint8 gray, for overlays
    qc: str = "ok"  # "ok", or ";"-separated reasons to look at this mask (see lungrt.inference.qc)
    qc_features: dict = field(default_factory=dict)
    error: str = ""  # an input that could not be segmented: the one-line reason (as infer's error rows); no mask
    status: str = "ok"  # "ok", "error", or "skipped" (no radiograph in it: a SEG, SR...; `note` says what)
    note: str = ""

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @classmethod
    def failed(
        cls, path: str | None, reason: str, status: str = "error", qc: str = "error", note: str = ""
    ) -> "LungResult":
        """The result of an input that was not segmented: no mask, no measurements, the reason (as infer's row)."""
        return cls(
            np.zeros((0, 0), bool),
            None,
            None,
            None,
            0.0,
            0.0,
            path=path,
            qc=qc or status,
            error=reason,
            status=status,
            note=note,
        )

    @property
    def shape(self) -> tuple[int, int]:
        return self.mask.shape  # type: ignore[return-value]

    @property
    def probability(self) -> np.ndarray:
        """float32 (H, W): the network's probabilities resized to the original, made when read
        (4 bytes a pixel: 20 MB for a 5-megapixel film, which most uses never need)."""
        return self.measured.probability

    def overlay(self) -> np.ndarray:
        """RGB uint8: the X-ray with the lung field tinted and outlined."""
        from lungrt.core.plots import overlay

        if self.image is None:
            raise LungrtError("this result keeps no image to draw on")
        return overlay(self.image, self.mask)

    def save(self, folder: PathLike, name: str | None = None, overlay: bool = True) -> dict[str, Path]:
        """NAME.mask.png (0/255) and NAME.overlay.png in `folder`; returns the paths."""
        from lungrt.data.io import write_png

        folder = Path(folder)
        stem = name or (Path(self.path).stem if self.path else "image")
        paths = {"mask": folder / f"{stem}.mask.png"}
        write_png(paths["mask"], self.mask.astype(np.uint8) * 255)
        if overlay and self.image is not None:
            paths["overlay"] = folder / f"{stem}.overlay.png"
            write_png(paths["overlay"], self.overlay())
        return paths


class LungSegmenter:
    """A lung-field segmenter on one backend. Create it with `LungSegmenter.load(...)`."""

    def __init__(self, runner: Runner, source: str):
        self.runner = runner
        self.source = source

    # -- construction -------------------------------------------------------------------------
    @classmethod
    def load(
        cls,
        source: PathLike = DEFAULT_MODEL,
        backend: str = "auto",
        precision: str | None = None,
        device: str = "auto",
        convention: str | None = None,
        second_opinion: bool | PathLike = False,
    ) -> "LungSegmenter":
        """`source`: a shipped name (unet, gsconv-unet, msag-unet), a lungrt checkpoint or run
        folder, an ONNX variant or a TensorRT engine (.plan/.engine).
        `backend`: auto | torch | onnxruntime | openvino | tensorrt | tensorrt-rtx (auto: a file's
        own engine; for weights, CUDA PyTorch on a GPU, else the recorded CPU choice or ONNX Runtime).
        `precision`: fp32 | fp16 | int8 | bf16 (openvino, torch); None: a file's own, else FP32.
        `convention`: lung-field | whole-lung (None: the model's own; a shipped name: its weights for it).
        `second_opinion`: True (the shipped whole-lung weights of the same architecture) or a whole-lung model's
        file: QC's `whole_lung_cover` flags a lung-field mask that stops short of their lung (twice the compute).
        A combination that cannot be honoured is refused (LungrtError), never replaced."""
        args = dict(backend=backend, precision=precision, device=device, convention=convention)
        return cls(open_runner(source, **args, second_opinion=second_opinion), str(source))

    @property
    def spec(self):
        return self.runner.spec

    @property
    def qc(self):
        return thresholds_of(self.runner.info.qc)  # parsed once, not for every image

    @property
    def model_name(self) -> str:
        return self.runner.info.name

    def __repr__(self) -> str:
        return f"LungSegmenter({self.model_name} on {self.runner.describe()}, from {self.source!r})"

    def close(self) -> None:
        self.runner.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- prediction ---------------------------------------------------------------------------
    def predict(
        self,
        x,
        batch_size: int = 8,
        postprocess: bool = True,
        stream: bool = False,
        workers: int = 2,
        complete_shape: bool = False,
        errors: str = "result",
    ):
        """A path, or a numpy array (H, W) of any integer, float or bool dtype -> one `LungResult`
        (an unreadable one raises LungrtError); a folder, a glob, or any iterable of paths/arrays (a list,
        a generator) -> their results in input order: a list, or with `stream=True` a generator that yields
        them batch by batch while reading ahead through a bounded window (`workers` threads, at most a few
        batches of decoded images in memory), as `lungrt infer` does: folders of any size in flat memory.
        No result is ever lost: `errors="result"` (default) gives an unreadable input a result of its own
        (`.ok` False, `.error` the reason, as infer's error rows); `errors="raise"` hands over every good
        result first, then raises `PredictErrors` (its `.results` hold them all). A source (a generator)
        that raises has everything before it segmented and yielded, then its exception re-raised.
        `complete_shape`: as infer's --complete-shape (off by default; the README has its gate)."""
        if errors not in ("result", "raise"):
            raise LungrtError(f"predict: errors={errors!r}; use 'result' or 'raise'")
        single = isinstance(x, np.ndarray) or (isinstance(x, (str, Path)) and Path(x).is_file())
        results = self._stream(x, batch_size, postprocess, workers, complete_shape)
        if single:
            first = next(results)
            results.close()  # ends the reader pool
            if not first.ok:
                raise LungrtError(f"{first.path or 'the array'}: {first.error or first.note or first.qc}")
            return first
        if errors == "raise":
            results = _raise_after(results)
        return results if stream else _listed(results)

    def _stream(
        self, x, batch_size: int, postprocess: bool, workers: int, complete_shape: bool
    ) -> Iterator[LungResult]:
        """`stream.segment` over the inputs (infer's reader, batch rule and errors), measured as infer measures."""
        if isinstance(x, (str, Path)) and not Path(x).is_file():
            x = collect_inputs([str(x)])  # a folder or a glob: listed first, as infer lists it
        count = 1 if isinstance(x, (np.ndarray, str, Path)) else len(x) if isinstance(x, (list, tuple)) else None
        size = batch_shape(batch_size, count, self.runner)  # a generator's length is unknown: full batches
        with thread_reader(self.spec, workers) as submit:
            for chunk in segment(self.runner, self._items(x), size, submit, read_window(size, workers)):
                yield from self._results(chunk, postprocess, complete_shape)

    def _results(self, chunk: list[Frame], postprocess: bool, complete_shape: bool) -> Iterator[LungResult]:
        good = [f for f in chunk if f.status == "ok"]
        probs, refs = stacked(good) if good else (None, None)
        feats = iter(features_many(probs, self.qc.shape, [f.xray.shape for f in good], refs) if good else [])
        for f in chunk:  # input order, failures in their place
            path = None if f.item.array is not None else str(f.item.source)
            if f.status != "ok":
                yield LungResult.failed(path, f.error, f.status, ";".join(f.skipped), f.note)
                continue
            m = measure(f.xray, f.prob, self.spec, postprocess, self.qc, complete_shape, next(feats))
            yield LungResult(
                m.mask > 0,
                m,
                m.right_px,
                m.left_px,
                m.lung_fraction,
                m.mean_confidence,
                m.right_mm2,
                m.left_mm2,
                path,
                f.xray.gray8,
                m.qc,
                m.qc_features,
            )

    def _items(self, x) -> Iterator[Item]:
        """One `Item` per image (an array travels inside its item), named as infer names them."""
        for k, one in enumerate(self._sources(x)):
            if isinstance(one, np.ndarray):
                yield Item(Path(f"array_{k}"), Path(f"array_{k}"), array=one)
            elif isinstance(one, Item):
                yield one
            else:
                yield Item(Path(one), Path(Path(one).name))

    def _sources(self, x) -> Iterator:
        """Paths and arrays, one per image, from what `predict` was given (checked as they come)."""
        if isinstance(x, np.ndarray):
            yield x
        elif isinstance(x, (str, Path)):
            if Path(x).is_file():
                yield x
            else:
                yield from collect_inputs([str(x)])
        elif isinstance(x, Iterable) and not isinstance(x, (bytes, dict)):
            for one in x:
                if not isinstance(one, (np.ndarray, str, Path, Item)):
                    raise LungrtError(
                        f"predict: an iterable must hold paths or 2-D arrays, not {type(one).__name__} "
                        "(for an image given as nested lists, pass np.asarray(...))"
                    )
                yield one
        else:
            raise LungrtError(
                f"predict: cannot read a {type(x).__name__}; give a path, an array or an iterable of them"
            )

    def infer(
        self, inputs: list[PathLike], out: PathLike, store: bool = False, store_flagged: bool = False, **options
    ) -> dict:
        """`lungrt infer` into folder `out`: files, folders, globs and DICOMweb study URLs; masks, results.csv,
        a journal for resume; `options` as `InferOptions` (dicom_seg=True, overlay=True, resume=True, ...).
        `store`: send this run's SEGs of PACS instances back to the PACS each came from (QC-flagged ones
        with `store_flagged`). The run's summary, with what was stored where under "stored"."""
        from lungrt.inference.infer import InferOptions
        from lungrt.jobs import infer_job

        opts = InferOptions(**{**options, "dicom_seg": options.get("dicom_seg", False) or store})
        return infer_job([str(i) for i in inputs], out, opts, self.runner, store=store, store_flagged=store_flagged)

    # -- the rest of the pipeline -------------------------------------------------------------
    def export(
        self,
        format: str = "onnx",
        precision: str = "fp32",
        out: PathLike | None = None,
        calib: PathLike | None = None,
        backend: str = "auto",
        targets: str | None = None,
        data: PathLike | None = None,
    ) -> Path:
        """`format="onnx"`: the precision variant (FP32/FP16/INT8 Q/DQ) as ONNX. `format="engine"`:
        a verified TensorRT engine (`backend` auto | tensorrt | tensorrt-rtx; `targets` e.g.
        "sm86" for TensorRT-RTX). INT8 is calibrated on `calib` (a dataset: its train split).
        Files go to `out` (a folder), else the cache. Returns the path written."""
        from lungrt.build import build_and_verify, choose_backend
        from lungrt.core.cache import cache_root, engines_dir
        from lungrt.models.checkpoint import resolve_model
        from lungrt.backends.tensorrt import BatchProfile, parse_targets
        from lungrt.build.variants import make_variant

        loaded = resolve_model(self.source)
        folder = Path(out) if out is not None else (engines_dir() if format == "engine" else cache_root() / "variants")
        if format == "onnx":
            return make_variant(loaded, precision, folder=folder, calib_dir=calib).path
        if format != "engine":
            raise LungrtError(f"export format must be onnx or engine, got {format!r}")
        be = choose_backend(backend)
        if be == "onnxruntime":
            raise LungrtError("no TensorRT flavour can build here; install lungrt[rtx] (RTX GPUs) or lungrt[trt]")
        b = build_and_verify(
            loaded,
            precision,
            be,
            folder,
            Path(calib) if calib else None,
            None,
            Path(data) if data else None,
            BatchProfile(),
            4.0,
            False,
            parse_targets(targets),
        )
        return b.path

    def evaluate(self, data: PathLike, split: str = "test", postprocess: bool = False) -> dict:
        """Mean Accuracy, IoU, mIoU, Dice, F1, Precision, Recall, HD95 on a labelled dataset split."""
        from lungrt.data.datasets import select_split
        from lungrt.evaluation.evaluate import evaluate

        res = evaluate(self.runner, select_split(data, split), postprocess=postprocess)
        return res["mean"]

    def benchmark(self, batch_size: int = 8, seconds: float = 3.0) -> dict:
        """Images per second of this segmenter's model call, and of PyTorch eager FP32 on the same
        inputs when the weights are at hand (ratio measured in one run)."""
        from lungrt.models.checkpoint import resolve_model
        from lungrt.export.onnx import reference_inputs
        from lungrt.evaluation.parity import throughput
        from lungrt.backends.pytorch import TorchRunner

        x = reference_inputs(self.spec, batch_size)
        out = {"backend": self.runner.describe(), "batch": batch_size, "img_per_s": throughput(self.runner, x, seconds)}
        try:
            reference = TorchRunner(resolve_model(self.source))
        except LungrtError:
            return out
        out["torch_fp32_img_per_s"] = throughput(reference, x, seconds)
        out["vs_torch_eager_fp32"] = out["img_per_s"] / out["torch_fp32_img_per_s"]
        return out


class PredictErrors(LungrtError):
    """`predict(..., errors="raise")`: some inputs could not be read; raised after every result was handed over."""

    def __init__(self, results: list[LungResult]):
        self.results = results
        self.errors = [r for r in results if r.status == "error"]
        first = self.errors[0]
        super().__init__(f"{len(self.errors)} of {len(results)} inputs could not be segmented; first: {first.error}")


def _raise_after(results: Iterator[LungResult]) -> Iterator[LungResult]:
    """The good results as they come; then PredictErrors if any input failed."""
    seen: list[LungResult] = []
    for r in results:
        seen.append(r)
        if r.status != "error":
            yield r
    if any(r.status == "error" for r in seen):
        raise PredictErrors(seen)


def _listed(results: Iterator[LungResult]) -> list[LungResult]:
    """`list(results)`; a raise after good results (errors="raise", a failing source) keeps them on the exception."""
    got: list[LungResult] = []
    try:
        for r in results:
            got.append(r)
    except PredictErrors:
        raise
    except Exception as e:
        e.results = got  # type: ignore[attr-defined]  # what was segmented before the source failed
        raise
    return got
