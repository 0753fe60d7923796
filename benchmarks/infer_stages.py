"""Where `lungrt infer` spends its time per image, stage by stage, at the shared X-rays' 512x512
and at native detector sizes (1000-4000 px), next to the bare model; then `lungrt infer` end to
end against the bare model (interleaved, lungrt/benchmark/endtoend.py) on the native-size sets.

    .venv/bin/python benchmarks/infer_stages.py --data ../shared/data/cxr-mc-sz --images 24

Native-size inputs are made from the shared X-rays (never written into the project): upscaled to
a random long side of 1000-4000 px, 16-bit with realistic detector noise, as PNG and as DICOM, in
a temporary folder. Each stage runs on one thread, as infer's helper threads do.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

from lungrt.backends.select import open_runner
from lungrt.benchmark.endtoend import interleaved_ratio
from lungrt.core.hardware import cpu_identity
from lungrt.data.datasets import discover_pairs
from lungrt.data.io import atomic_write_bytes, encode_mask_png1, read_xray
from lungrt.export.variants import make_variant
from lungrt.inference.infer import _PNG_FAST, _png, collect_inputs, measure
from lungrt.inference.qc import QCThresholds
from lungrt.models.checkpoint import resolve_model

RESULTS = Path(__file__).parent / "results"


def native_copies(sources: list[Path], folder: Path, seed: int = 0) -> dict[str, list[Path]]:
    """16-bit PNG and DICOM versions of `sources` at a random long side of 1000-4000 px."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    rng = np.random.default_rng(seed)
    out: dict[str, list[Path]] = {"png16": [], "dicom": []}
    for kind in out:
        (folder / kind).mkdir()
    for i, src in enumerate(sources):
        u8 = read_xray(src).gray8
        side = int(np.exp(rng.uniform(np.log(1000), np.log(4000))))  # log-uniform: median 2000 px
        aspect = rng.uniform(0.8, 1.25)
        h, w = side, int(side / aspect) if aspect > 1 else side
        img = cv2.resize(u8.astype(np.float32) * 16.0, (w, h), interpolation=cv2.INTER_CUBIC)  # 12-bit range
        img += rng.normal(0, 12.0, img.shape).astype(np.float32)  # quantum noise at detector scale
        img16 = np.clip(img, 0, 4095).astype(np.uint16)
        png = folder / "png16" / f"x{i:03d}.png"
        cv2.imwrite(str(png), img16)
        out["png16"].append(png)
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = SecondaryCaptureImageStorage, generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
        ds.Modality, ds.PhotometricInterpretation, ds.SamplesPerPixel = "DX", "MONOCHROME2", 1
        ds.Rows, ds.Columns, ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = h, w, 16, 12, 11, 0
        ds.PixelSpacing = [0.143, 0.143]
        ds.PixelData = img16.tobytes()
        dcm = folder / "dicom" / f"x{i:03d}.dcm"
        ds.save_as(str(dcm), enforce_file_format=True)
        out["dicom"].append(dcm)
    return out


def stage_times(files: list[Path], runner, batch: int, out_dir: Path) -> dict:
    """Mean milliseconds per image of each stage infer runs for one image."""
    t = {k: 0.0 for k in ("decode", "preprocess", "model", "mask_and_measure", "encode_png", "write", "encode_png8")}
    qc = QCThresholds.from_dict(runner.info.qc)
    pixels = 0
    for start in range(0, len(files), batch):
        chunk = files[start : start + batch]
        xrays, tensors = [], []
        for f in chunk:
            t0 = time.perf_counter()
            xr = read_xray(f)
            t1 = time.perf_counter()
            tensors.append(runner.spec.apply_xray(xr))
            t["decode"] += t1 - t0
            t["preprocess"] += time.perf_counter() - t1
            xrays.append(xr)
            pixels += xr.shape[0] * xr.shape[1]
        x = np.stack(tensors + [tensors[-1]] * (batch - len(tensors)))
        t0 = time.perf_counter()
        probs = runner.run(x)
        t["model"] += (time.perf_counter() - t0) * len(chunk) / batch * batch / len(chunk)  # a full batch's time
        for xr, p, f in zip(xrays, probs, chunk):
            t0 = time.perf_counter()
            m = measure(xr, p[0], runner.spec, True, qc)
            t1 = time.perf_counter()
            data = encode_mask_png1(m.mask)  # what infer writes (--mask-bits 1, the default)
            t2 = time.perf_counter()
            atomic_write_bytes(out_dir / (f.stem + ".png"), data, durable=False)
            t3 = time.perf_counter()
            _png(m.mask, _PNG_FAST)  # what it wrote before (--mask-bits 8), timed in the same run
            t["encode_png8"] += time.perf_counter() - t3
            t["mask_and_measure"] += t1 - t0
            t["encode_png"] += t2 - t1
            t["write"] += t3 - t2
    n = len(files)
    ms = {k: 1000 * v / n for k, v in t.items()}
    ms["model"] = 1000 * t["model"] / (-(-n // batch) * batch)  # per image of a full batch
    ms["megapixels"] = pixels / n / 1e6
    return ms


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--model", default="msag-unet")
    ap.add_argument("--images", type=int, default=48)
    ap.add_argument("--batch", type=int, default=8)
    args = ap.parse_args()
    loaded = resolve_model(args.model)
    runner = open_runner(make_variant(loaded, "fp32").path, backend="openvino", precision="fp32")
    sources = [p.image for p in discover_pairs(args.data).pairs][:: max(1, 704 // args.images)][: args.images]
    results = {"hardware": cpu_identity(), "model": args.model, "backend": runner.describe(), "batch": args.batch, "rows": {}}
    with tempfile.TemporaryDirectory(prefix="lungrt-stages-") as tmp:
        tmp = Path(tmp)
        native = native_copies(sources, tmp)
        (tmp / "out").mkdir()
        stage_times(sources[:4], runner, args.batch, tmp / "out")  # warm-up
        for name, files in (("512 PNG (shared)", sources), ("native 16-bit PNG", native["png16"]), ("native DICOM", native["dicom"])):
            results["rows"][name] = stage_times(files, runner, args.batch, tmp / "out")
            print(name, json.dumps({k: round(v, 1) for k, v in results["rows"][name].items()}), flush=True)
        x = np.stack([runner.spec.apply_xray(read_xray(f)) for f in sources[: args.batch]])
        for name, kind in (("native 16-bit PNG", "png16"), ("native DICOM", "dicom")):
            items = collect_inputs([str(tmp / kind)])
            chunks = max(1, len(items) // (2 * args.batch))  # whole batches per chunk: no padding in the bare side
            results["rows"][name]["end_to_end"] = interleaved_ratio(runner, items, x, args.batch, passes=1, chunks=chunks)
            print(name, results["rows"][name]["end_to_end"], flush=True)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "infer_stages.json").write_text(json.dumps(results, indent=2))
    stages = ("decode", "preprocess", "mask_and_measure", "encode_png", "write")
    print(f"\n{args.model} on {results['backend']}, batch {args.batch}; {results['hardware']['cpu']} "
          f"({' '.join(results['hardware']['cpu_flags'])}); ms per image, one thread per stage:\n")
    print("| input | MP | " + " | ".join(stages) + " | all but model | with 8-bit PNG (before) | model |")
    print("|---|---|" + "---|" * (len(stages) + 3))
    for name, r in results["rows"].items():
        rest = sum(r[s] for s in stages)
        before = rest - r["encode_png"] + r["encode_png8"]
        print(f"| {name} | {r['megapixels']:.1f} | " + " | ".join(f"{r[s]:.1f}" for s in stages)
              + f" | {rest:.1f} | {before:.1f} | {r['model']:.1f} |")
    print("\n| input | end-to-end img/s | bare model img/s | ratio | per round |\n|---|---|---|---|---|")
    for name, r in results["rows"].items():
        if "end_to_end" in r:
            e = r["end_to_end"]
            print(f"| {name} | {e['end_to_end_img_per_s']:.1f} | {e['bare_model_img_per_s']:.1f} | {e['ratio']:.2f} | "
                  f"{min(e['ratio_per_round']):.2f}-{max(e['ratio_per_round']):.2f} |")


if __name__ == "__main__":
    main()
