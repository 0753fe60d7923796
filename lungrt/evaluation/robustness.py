"""Robustness benchmark: does the mask keep opacified lung inside it?

Test images get a synthetic abnormality painted over the gold lung field (consolidation, haze and
effusion inside it; silhouette, consolidation that spills past the lung's edge and hides it; mild /
moderate / severe; `abnormalities.paint_benchmark`, a different shape family and seed stream from
the training augmentation), and are scored against the unchanged gold masks.
The Dice drop is measured against the same images without the abnormality.
"""

from __future__ import annotations

import hashlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from lungrt.data.abnormalities import KINDS, SEVERITIES, paint_benchmark
from lungrt.data.datasets import Pair
from lungrt.data.io import read_mask, read_xray
from lungrt.evaluation.metrics import segmentation_metrics
from lungrt.core.progress import progress_bar
from lungrt.backends.base import Runner

BENCH_SEED = 20261123  # the training augmentation draws from per-batch generator seeds, never this stream


def _seed(name: str, kind: str, severity: str) -> int:
    return int(hashlib.sha256(f"{BENCH_SEED}:{name}:{kind}:{severity}".encode()).hexdigest()[:8], 16)


def _cases(pair: Pair, spec, kinds, severities):
    xr = read_xray(pair.image)
    gold = read_mask(pair.mask)
    if gold.shape != xr.shape:
        import cv2

        gold = cv2.resize(gold.astype(np.uint8), xr.shape[::-1], interpolation=cv2.INTER_NEAREST) > 0
    pixels = xr.pixels
    out = [("clean", "none", pixels)]
    for kind in kinds:
        for sev in severities:
            out.append((kind, sev, paint_benchmark(pixels, gold, kind, sev, _seed(pair.name, kind, sev))))
    return pair.name, gold, [(k, s, img, spec.apply(img)) for k, s, img in out]


def run_robustness(runner: Runner, pairs: list[Pair], kinds=KINDS, severities=SEVERITIES, keep_worst: int = 8) -> dict:
    """Per (kind, severity): mean Dice, mean drop against the clean image, share of images that
    lose more than 0.05 Dice; plus the worst cases (for a picture)."""
    spec = runner.spec
    per: dict[tuple[str, str], list[float]] = {}
    drops: dict[tuple[str, str], list[float]] = {}
    worst: list[tuple] = []
    with ThreadPoolExecutor(max_workers=2) as pool, progress_bar() as bar:
        task = bar.add_task(f"robustness {runner.describe()}", total=len(pairs))
        for name, gold, cases in pool.map(lambda p: _cases(p, spec, kinds, severities), pairs):
            probs = runner.run(np.stack([c[3] for c in cases]))
            clean = None
            for (kind, sev, img, _), p in zip(cases, probs):
                pred = spec.invert_mask(p[0], gold.shape) > 0
                dice = segmentation_metrics(pred, gold)["dice"]
                per.setdefault((kind, sev), []).append(dice)
                if kind == "clean":
                    clean = dice
                    continue
                drops.setdefault((kind, sev), []).append(clean - dice)
                worst.append((clean - dice, name, kind, sev, img, gold, pred))
                worst = sorted(worst, key=lambda w: -w[0])[:keep_worst]
            bar.advance(task)
    rows = []
    for (kind, sev), dices in per.items():
        d = np.array(drops.get((kind, sev), [0.0]))
        rows.append(
            {
                "kind": kind,
                "severity": sev,
                "images": len(dices),
                "dice": float(np.mean(dices)),
                "dice_drop": float(d.mean()),
                "share_losing_over_0.05": float((d > 0.05).mean()),
                "worst_drop": float(d.max()),
            }
        )
    return {"model": runner.info.name, "backend": runner.describe(), "rows": rows, "worst": worst}


def severity_summary(rows: list[dict]) -> dict[str, float]:
    """Mean Dice drop per severity over all kinds."""
    out = {}
    for sev in SEVERITIES:
        ds = [r["dice_drop"] for r in rows if r["severity"] == sev]
        if ds:
            out[sev] = float(np.mean(ds))
    return out


def worst_cases_png(result: dict, path: str | Path) -> Path:
    """A grid of the worst cases: the painted X-ray with the gold outline (green) and the
    predicted mask outline (red)."""
    import cv2

    from lungrt.core.plots import figure

    worst = result["worst"]
    cols = 4
    rows = max(1, (len(worst) + cols - 1) // cols)
    fig = figure(figsize=(3.2 * cols, 3.4 * rows))
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, (drop, name, kind, sev, img, gold, pred) in zip(axes.ravel(), worst):
        rgb = cv2.cvtColor((np.clip(img, 0, 1) * 255).astype(np.uint8), cv2.COLOR_GRAY2RGB)
        for m, color in ((gold, (0, 255, 0)), (pred, (255, 0, 0))):
            cnts, _ = cv2.findContours(m.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
            cv2.drawContours(rgb, cnts, -1, color, 2)
        ax.imshow(rgb)
        ax.set_title(f"{name}\n{kind} {sev}: Dice -{drop:.3f}", fontsize=8)
    fig.suptitle(
        f"{result['model']}: worst cases of the robustness benchmark (green gold, red prediction)", fontsize=10
    )
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    return path
