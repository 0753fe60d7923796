"""Where `lungrt infer` spends its host time per image, stage by stage, at the shared X-rays'
512x512 and at native detector sizes (1000-4000 px), for this working tree and an older release
side by side in one run (alternating rounds, same files, same minute); then `lungrt infer` end to
end against the bare model (interleaved, lungrt/benchmark/endtoend.py) on native-size DICOM, for
both releases, and for this one on the model's recorded CPU choice.

    .venv/bin/python benchmarks/infer_stages.py --data ../shared/data/cxr-mc-sz --images 24

Native-size inputs are made from the shared X-rays (never written into the project): upscaled to
a random long side of 1000-4000 px, 16-bit with realistic detector noise, as PNG and as DICOM, in
a temporary folder. Host stages are timed in core-milliseconds by `_host_stages.py` in a process
of their own on probabilities computed once (no model runs beside them); `--baseline` is unpacked
from git into the temporary folder (default: the release the host-cost issue measured).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import cv2
import numpy as np

from lungrt.build.resolve import open_runner
from lungrt.core.hardware import cpu_identity
from lungrt.data.datasets import discover_pairs
from lungrt.data.io import read_xray
from lungrt.build.variants import make_variant
from lungrt.evaluation.parity import throughput
from lungrt.models.checkpoint import resolve_model

HERE = Path(__file__).resolve().parent
STAGES = ("decode", "preprocess", "mask_and_measure", "encode_png", "write")

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


def run_worker(pythonpath: Path, config: dict, tmp: Path) -> dict:
    """One `_host_stages.py` run under the lungrt found at `pythonpath`."""
    cfg = tmp / f"cfg-{os.getpid()}-{len(list(tmp.glob('cfg-*')))}.json"
    cfg.write_text(json.dumps(config))
    env = {**os.environ, "PYTHONPATH": str(pythonpath)}
    done = subprocess.run(
        [sys.executable, str(HERE / "_host_stages.py"), str(cfg)],
        env=env,
        cwd=tmp,
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode:
        raise RuntimeError(f"{pythonpath}: {done.stderr.strip().splitlines()[-1]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def unpack_release(rev: str, folder: Path) -> Path:
    """The `lungrt` package of git revision `rev`, unpacked under `folder` (weights and all)."""
    archive = subprocess.run(
        ["git", "-C", str(HERE.parent), "archive", rev, "lungrt"], capture_output=True, check=True
    ).stdout
    folder.mkdir()
    subprocess.run(["tar", "-x", "-C", str(folder)], input=archive, check=True)
    return folder


def best_rows(rounds: list[dict]) -> dict:
    """Per stage, the least core time over the rounds: on a shared machine noise only ever adds."""
    return {name: {k: min(r[name][k] for r in rounds) for k in rounds[0][name]} for name in rounds[0]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--model", default="msag-unet")
    ap.add_argument("--images", type=int, default=48)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument(
        "--rounds", type=int, default=5, help="alternating rounds of both releases; the least per stage is shown"
    )
    ap.add_argument(
        "--baseline", default="a79fb87", help="git revision to compare with (default: the release the issue measured)"
    )
    args = ap.parse_args()
    loaded = resolve_model(args.model)
    fp32 = make_variant(loaded, "fp32").path
    runner = open_runner(fp32, backend="openvino", precision="fp32")
    sources = [p.image for p in discover_pairs(args.data).pairs][:: max(1, 704 // args.images)][: args.images]
    results = {
        "hardware": cpu_identity(),
        "model": args.model,
        "backend": runner.describe(),
        "batch": args.batch,
        "baseline": args.baseline,
        "rounds": args.rounds,
        "rows": {},
        "end_to_end": {},
    }
    with tempfile.TemporaryDirectory(prefix="lungrt-stages-") as tmp:
        tmp = Path(tmp)
        native = native_copies(sources, tmp)
        sets = {
            "512 PNG (shared)": [f.resolve() for f in sources],
            "native 16-bit PNG": native["png16"],
            "native DICOM": native["dicom"],
        }
        probs = {}
        for name, files in sets.items():  # the model's output, once, shared by both releases' workers
            x = np.stack([runner.spec.apply_xray(read_xray(f)) for f in files])
            probs[name] = str(tmp / f"probs-{len(probs)}.npy")
            np.save(
                probs[name],
                np.concatenate([runner.run(x[i : i + args.batch]) for i in range(0, len(x), args.batch)])[:, 0],
            )
        batch = x[: args.batch]
        np.save(tmp / "batch.npy", batch)
        model_ms = 1000 / throughput(runner, batch, seconds=5)
        releases = {"before": unpack_release(args.baseline, tmp / "baseline"), "now": HERE.parent}
        config = {
            "sets": {n: [str(f) for f in fs] for n, fs in sets.items()},
            "probs": probs,
            "spec": runner.spec.to_dict(),
            "qc": runner.info.qc,
            "batch": args.batch,
        }
        rounds = {k: [] for k in releases}
        for r in range(args.rounds):
            for name in list(releases) if r % 2 == 0 else list(releases)[::-1]:
                out = str(tmp / f"out-{name}-{r}")  # new files, as a fresh infer run writes (not replacements)
                rounds[name].append(run_worker(releases[name], {**config, "out": out}, tmp))
                print(
                    name,
                    r,
                    json.dumps({s: {k: round(v, 1) for k, v in row.items()} for s, row in rounds[name][-1].items()}),
                    flush=True,
                )
        for name in releases:
            results["rows"][name] = best_rows(rounds[name])
        e2e = {"folder": str(tmp / "dicom"), "onnx": str(fp32), "batch_input": str(tmp / "batch.npy")}
        for key, release, extra in (
            ("before, OpenVINO FP32", "before", {}),
            ("now, OpenVINO FP32", "now", {}),
            ("now, recorded CPU choice", "now", {"model": args.model}),
        ):
            results["end_to_end"][key] = run_worker(releases[release], {"end_to_end": {**e2e, **extra}}, tmp)
            print(key, results["end_to_end"][key], flush=True)
    results["model_ms"] = model_ms
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "infer_stages.json").write_text(json.dumps(results, indent=2))
    print_tables(results)


def print_tables(results: dict) -> None:
    hw = results["hardware"]
    print(
        f"\n{results['model']} on {results['backend']} (model {results['model_ms']:.1f} ms per image at batch "
        f"{results['batch']}); {hw['cpu']} ({' '.join(hw['cpu_flags'])}); host core-ms per image, least of "
        f"{results['rounds']} alternating rounds; before = {results['baseline']}:\n"
    )
    print(
        "| input | MP | " + " | ".join(f"{s} (before -> now)" for s in STAGES) + " | all but the model, before -> now |"
    )
    print("|---|---|" + "---|" * (len(STAGES) + 1))
    before, now = results["rows"]["before"], results["rows"]["now"]
    for name in now:
        b, n = before[name], now[name]
        print(
            f"| {name} | {n['megapixels']:.1f} | "
            + " | ".join(f"{b[s]:.1f} -> {n[s]:.1f}" for s in STAGES)
            + f" | **{sum(b[s] for s in STAGES):.1f} -> {sum(n[s] for s in STAGES):.1f}** |"
        )
    print(
        "\n| native DICOM, end to end | runner | end-to-end img/s | bare model img/s | ratio |\n|---|---|---|---|---|"
    )
    for key, e in results["end_to_end"].items():
        print(
            (
                f"| {key} | {e['backend']} | {e['end_to_end_img_per_s']:.1f} | "
                f"{e['bare_model_img_per_s']:.1f} | **{e['ratio']:.2f}** |"
            )
        )


if __name__ == "__main__":
    main()
