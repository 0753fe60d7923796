"""Regenerates the README's measured tables, each measured in one run on this machine.

    .venv/bin/python benchmarks/readme_tables.py accuracy --data ../shared/data/cxr-mc-sz
    .venv/bin/python benchmarks/readme_tables.py robustness --data ../shared/data/cxr-mc-sz
    .venv/bin/python benchmarks/readme_tables.py parity   --data ../shared/data/cxr-mc-sz
    .venv/bin/python benchmarks/readme_tables.py bench    --data ../shared/data/cxr-mc-sz
    .venv/bin/python benchmarks/readme_tables.py infer    --data ../shared/data/cxr-mc-sz

Each prints a Markdown table and writes its JSON under benchmarks/results/.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from lungrt.benchmark.bench import hardware, run_bench
from lungrt.models.checkpoint import resolve_model
from lungrt.data.datasets import discover_pairs, select_split
from lungrt.evaluation.evaluate import by_behind_heart, evaluate
from lungrt.inference.infer import collect_inputs
from lungrt.data.io import read_xray
from lungrt.evaluation.parity import GATES, apply_gate, compare
from lungrt.backends.openvino import native_bf16
from lungrt.build.resolve import open_runner
from lungrt.backends.base import Runner
from lungrt.backends.pytorch import TorchRunner
from lungrt.build.variants import make_variant
from lungrt.data.datasets import validation_pairs

MODELS = ("unet", "gsconv-unet", "msag-unet")
RESULTS = Path(__file__).parent / "results"


def save(name: str, payload: dict) -> None:
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(payload, indent=2, default=str))


def first_batch(loaded, paths, n: int = 8) -> np.ndarray:
    return np.stack([loaded.spec.apply_xray(read_xray(p)) for p in paths[:n]])


def fp32_runner(name: str) -> Runner:
    """ONNX Runtime FP32 of a shipped model: the same masks as PyTorch FP32 (parity agreement
    1.00000), several times faster, for the accuracy-only tables."""
    return open_runner(make_variant(resolve_model(name), "fp32").path, backend="onnxruntime")


def accuracy(data: Path) -> None:
    pairs = select_split(data, "test")
    rows = {}
    for name in MODELS:
        loaded = resolve_model(name)
        with fp32_runner(name) as r:
            raw = evaluate(r, pairs)
            post = evaluate(r, pairs, postprocess=True)
        by_source = {}
        for src in sorted({p.source for p in pairs}):
            sel = [x for x in post["per_image"] if x["name"].startswith(src)]
            by_source[src] = {
                "images": len(sel),
                "dice": float(np.mean([x["dice"] for x in sel])),
                "hd95": float(np.nanmean([x["hd95"] for x in sel])),
                "behind_heart": by_behind_heart(sel),
            }
        rows[name] = {
            "raw": raw["mean"],
            "postprocessed": post["mean"],
            "by_source_postprocessed": by_source,
            "behind_heart": by_behind_heart(post["per_image"]),
            "training": loaded.info.training,
            "width": loaded.info.width,
        }
    save("accuracy", rows)
    print(
        f"Test split: {len(pairs)} images, per-image mean at native 512x512; FP32 (ONNX Runtime, equal to PyTorch).\n"
    )
    print("| model | Accuracy | IoU | mIoU | Dice | F1 | Precision | Recall | HD95 (px) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, r in rows.items():
        m = r["raw"]
        print(
            f"| {name} | "
            + " | ".join(f"{m[k]:.4f}" for k in ("accuracy", "iou", "miou", "dice", "f1", "precision", "recall"))
            + f" | {m['hd95']:.2f} |"
        )
    print("\nWith infer's clean-up (the default), per source:\n")
    print("| model | Dice | HD95 (px) | Montgomery Dice | Montgomery HD95 | Shenzhen Dice | Shenzhen HD95 |")
    print("|---|---|---|---|---|---|---|")
    for name, r in rows.items():
        m, src = r["postprocessed"], r["by_source_postprocessed"]
        mc, sz = src.get("MCUCXR", {}), src.get("CHNCXR", {})
        print(
            f"| {name} | {m['dice']:.4f} | {m['hd95']:.2f} | {mc.get('dice', float('nan')):.4f} | "
            f"{mc.get('hd95', float('nan')):.2f} | {sz.get('dice', float('nan')):.4f} | "
            f"{sz.get('hd95', float('nan')):.2f} |"
        )
    print_behind_heart(rows)


def print_behind_heart(rows: dict) -> None:
    """How much of the error sits where gold and prediction differ about the lung behind the heart."""
    share = next(iter(rows.values()))["behind_heart"]["share"]
    print(
        f"\nImages where gold and prediction differ behind the heart by > {share:.0%} of the lung area "
        "(lungrt.evaluation.metrics.behind_heart; clean-up on), and the rest:\n"
    )
    print("| model | source | differ: images | differ: Dice / HD95 | rest: images | rest: Dice / HD95 |")
    print("|---|---|---|---|---|---|")
    for name, r in rows.items():
        for src, b in [
            *((s, v["behind_heart"]) for s, v in r["by_source_postprocessed"].items()),
            ("all", r["behind_heart"]),
        ]:
            d, o = b["differ"], b["rest"]
            print(
                f"| {name} | {src} | {d['images']} | "
                + (f"{d['dice']:.4f} / {d['hd95']:.2f}" if d["images"] else "-")
                + f" | {o['images']} | {o['dice']:.4f} / {o['hd95']:.2f} |"
            )


def robustness(data: Path) -> None:
    """Synthetic abnormalities inside the gold lung field (benchmark family, not the training one)."""
    from lungrt.evaluation.robustness import run_robustness, worst_cases_png

    pairs = select_split(data, "test")
    out = {}
    for name in MODELS:
        with fp32_runner(name) as r:
            res = run_robustness(r, pairs)
        worst_cases_png(res, RESULTS / f"robustness_worst_{name}.png")  # real X-rays: git-ignored, look only
        res.pop("worst")
        out[name] = res
    save("robustness", out)
    print_robustness(out, len(pairs))


def print_robustness(out: dict, images: int) -> None:
    from lungrt.data.abnormalities import KINDS
    from lungrt.evaluation.robustness import severity_summary

    print(
        f"Test split ({images} images), each with every abnormality painted over its gold lung field (silhouette: "
        "past its edge too); Dice against the unchanged gold mask, drop against the same image without it.\n"
    )
    print("| model | kind | mild drop | moderate drop | severe drop | severe: share losing > 0.05 |")
    print("|---|---|---|---|---|---|")
    for name, res in out.items():
        for kind in KINDS:
            by = {r["severity"]: r for r in res["rows"] if r["kind"] == kind}
            print(
                f"| {name} | {kind} | {by['mild']['dice_drop']:+.4f} | {by['moderate']['dice_drop']:+.4f} | "
                f"{by['severe']['dice_drop']:+.4f} | {by['severe']['share_losing_over_0.05']:.1%} |"
            )
        summ = severity_summary(res["rows"])
        print(f"| {name} | **all kinds** | {summ['mild']:+.4f} | {summ['moderate']:+.4f} | {summ['severe']:+.4f} | |")


def parity(data: Path, models=MODELS) -> None:
    """Accuracy parity of every variant (no timing here: throughput comes from `bench`, measured
    on a quiet machine, and `join` prints both in one table)."""
    test, val = select_split(data, "test"), select_split(data, "val")
    rows = []
    for name in models:
        loaded = resolve_model(name)
        reference = TorchRunner(loaded)
        # (backend, variant): ONNX Runtime runs the graphs TensorRT compiles plus its own CPU INT8;
        # OpenVINO its bf16 mode on the FP32 graph and its NNCF INT8
        configs = [
            ("onnxruntime", "fp32", "portable"),
            ("onnxruntime", "fp16", "portable"),
            ("onnxruntime", "int8", "portable"),
            ("onnxruntime", "int8", "onnxruntime"),
            ("openvino", "int8", "openvino"),
        ]
        if native_bf16():
            configs.insert(3, ("openvino", "bf16", "portable"))
        for backend, precision, target in configs:
            v = make_variant(
                loaded,
                "fp32" if precision == "bf16" else precision,
                calib_dir=data,
                target=target,
                val_pairs=val if precision == "int8" else None,
            )
            cand = open_runner(v.path, backend=backend, precision=precision)
            with cand:
                s = compare(reference, cand, test)["summary"]
            s.pop("worst")
            recipe = (
                {"portable": "TensorRT Q/DQ", "onnxruntime": "ORT CPU Q/DQ", "openvino": "NNCF"}[target]
                if precision == "int8"
                else ""
            )
            rows.append(
                {
                    "model": name,
                    "backend": backend,
                    "variant": precision,
                    "recipe": recipe,
                    **s,
                    "gate": apply_gate(s, GATES[precision]),
                    "notes": v.notes,
                }
            )
            print(
                (
                    f"{name} {backend} {precision} {recipe}: agreement {s['mask_agreement']:.5f} "
                    f"drop {s['dice_drop']:+.5f}"
                ),
                flush=True,
            )
    save(f"parity_{'_'.join(models)}" if models != MODELS else "parity", {"test_images": len(test), "rows": rows})


def join(data: Path) -> None:
    """The README's precision table: parity (results/parity*.json) beside bench throughput at batch 8."""
    rows = [r for f in sorted(RESULTS.glob("parity*.json")) for r in json.loads(f.read_text())["rows"]]
    bench = json.loads((RESULTS / "bench_cpu.json").read_text())
    ips = {
        (m, r["backend"], r["variant"]): r
        for m, res in bench.items()
        for r in res["rows"]
        if r.get("batch") == 8 and "img_per_s" in r
    }
    print(
        (
            "| model | backend | variant | mask agreement (min) | Dice PyTorch "
            "| Dice variant | drop | gate | INT8 blocks kept float | img/s "
            "b8 | vs eager FP32 |"
        )
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        backend = r.get("backend", "onnxruntime")
        portable_int8 = r["variant"] == "int8" and r.get("recipe") == "TensorRT Q/DQ"
        b = None if portable_int8 or r["variant"] == "fp16" else ips.get((r["model"], backend, r["variant"]))
        kept = ", ".join(r["notes"].get("excluded_blocks") or []) if r["variant"] == "int8" else ""
        variant = f"{r['variant']} ({r['recipe']})" if r.get("recipe") else r["variant"]
        print(
            f"| {r['model']} | {backend} | {variant} | {r['mask_agreement']:.5f} ({r['min_mask_agreement']:.4f}) | "
            f"{r['dice_reference']:.4f} | {r['dice_candidate']:.4f} | {r['dice_drop']:+.5f} | "
            f"{'pass' if r['gate']['passed'] else 'FAIL'} | {kept or ('none' if r['variant'] == 'int8' else '')} | "
            + (f"{b['img_per_s']:.1f} | {b['vs_torch_eager_fp32']:.2f}x |" if b else "- | - |")
        )


def bench(data: Path, save_as: str = "bench_cpu") -> None:
    """`save_as`: the results file (bench_cpu: the AMX machine's; bench_cpu_<class> for other CPU classes)."""
    out = {}
    for name in MODELS:
        loaded = resolve_model(name)
        res = run_bench(
            loaded,
            ["torch", "onnxruntime", "openvino"],
            ["fp32", "bf16", "int8"],
            [8],
            iters=3,
            rounds=3,
            variant_path=lambda v, backend, loaded=loaded: (
                make_variant(
                    loaded, v, calib_dir=data, target=backend, val_pairs=validation_pairs(data) if v == "int8" else None
                ).path
            ),
        )
        out[name] = res
    save(save_as, out)
    hw = next(iter(out.values()))["hardware"]
    print(
        f"CPU: {hw['cpu']}, {hw['cpu_count']} cores, flags {' '.join(hw['cpu_flags'])}; "
        "3 interleaved rounds x 3 timed calls per row.\n"
    )
    print("| model | backend | variant | batch | img/s (min-max) | p50 ms | p99 ms | vs eager FP32 |")
    print("|---|---|---|---|---|---|---|---|")
    for name, res in out.items():
        for r in res["rows"]:
            if "img_per_s" in r:
                print(
                    f"| {name} | {r['backend']} | {r['variant']} | {r['batch']} | {r['img_per_s']:.1f} "
                    f"({r['img_per_s_min']:.1f}-{r['img_per_s_max']:.1f}) | {r['latency_ms_p50']:.0f} | "
                    f"{r['latency_ms_p99']:.0f} | {r['vs_torch_eager_fp32']:.2f}x |"
                )


def infer_runners(loaded, only_chosen: bool = False):
    """The configurations infer is measured with: ONNX Runtime FP32, PyTorch eager FP32, and the
    CPU configuration `lungrt build --backend cpu --precision auto` recorded here, if any."""
    from lungrt.build.resolve import open_recorded_cpu_choice

    if not only_chosen:
        yield open_runner(make_variant(loaded, "fp32").path, backend="onnxruntime")
        yield TorchRunner(loaded)
    chosen = open_recorded_cpu_choice(loaded)
    if chosen is not None:
        yield chosen


def infer(
    data: Path, model: str = "unet", batch_size: int = 8, passes: int = 2, chunks: int = 4, only_chosen: bool = False
) -> None:
    """End-to-end `run_infer` vs the bare model on the same runner, interleaved (see
    lungrt/benchmark/endtoend.py)."""
    import os

    from lungrt.benchmark.endtoend import interleaved_ratio, pipeline_core_ms

    items = collect_inputs([str(data / "images")])
    loaded = resolve_model(model)
    x = first_batch(loaded, [it.source for it in items], batch_size)
    rows, cores = [], os.cpu_count() or 1
    for runner in infer_runners(loaded, only_chosen):
        with runner:
            row = interleaved_ratio(runner, items, x, batch_size, passes, chunks)
            # the most end to end can keep when model and pipeline share the cores
            row["pipeline_core_ms"] = pipeline_core_ms(runner, items, x, batch_size)
            row["model_core_ms"] = 1000.0 * cores / row["bare_model_img_per_s"]
            row["ceiling"] = row["model_core_ms"] / (row["model_core_ms"] + row["pipeline_core_ms"])
            rows.append(row)
        print(f"{rows[-1]['backend']}: {rows[-1]}", flush=True)
    save(
        "infer_throughput" if model == "unet" else f"infer_throughput_{model}",
        {"hardware": hardware(), "model": model, "batch_size": batch_size, "rows": rows},
    )
    print(
        f"\n`lungrt infer` on the {len(items)} shared X-rays x {passes} passes ({model}, batch {batch_size}, 2 worker "
        f"threads) vs the bare model on the same backend and batch size, {chunks * passes} interleaved rounds:\n"
    )
    print(
        (
            "| backend | end-to-end img/s | bare model img/s | ratio | ratio "
            "per round (min-max) | model core-ms | rest core-ms | ceiling "
            "|"
        )
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['backend']} | {r['end_to_end_img_per_s']:.1f} | {r['bare_model_img_per_s']:.1f} | "
            f"{r['ratio']:.2f} | "
            f"{min(r['ratio_per_round']):.2f}-{max(r['ratio_per_round']):.2f} | {r['model_core_ms']:.1f} | "
            f"{r['pipeline_core_ms']:.1f} | {r['ceiling']:.2f} |"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("table", choices=["accuracy", "robustness", "parity", "bench", "infer", "join", "all"])
    ap.add_argument("--data", type=Path, default=Path("../shared/data/cxr-mc-sz"))
    ap.add_argument("--models", default=",".join(MODELS), help="parity: comma list of shipped models; infer: the first")
    ap.add_argument("--only-chosen", action="store_true", help="infer: only the recorded CPU choice")
    ap.add_argument("--save-as", default="bench_cpu", help="bench: results file name (another CPU class keeps its own)")
    args = ap.parse_args()
    if not discover_pairs(args.data).pairs:
        raise SystemExit(f"{args.data}: no labelled X-rays found")
    if args.table == "parity":
        return parity(args.data, tuple(args.models.split(",")))
    if args.table == "bench":
        return bench(args.data, args.save_as)
    if args.table == "infer" and args.models != ",".join(MODELS):
        return infer(args.data, args.models.split(",")[0], only_chosen=args.only_chosen)
    for table in (
        ["accuracy", "robustness", "parity", "bench", "infer", "join"] if args.table == "all" else [args.table]
    ):
        globals()[table](args.data)


if __name__ == "__main__":
    main()
