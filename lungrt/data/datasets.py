"""Datasets: discover image/mask pairs, split them deterministically, load them for training.

Layouts understood: `DIR/images/NAME.ext` + `DIR/masks/NAME.ext` (mask stems may end in `_mask`),
and `NAME.ext` + `NAME_mask.ext` side by side anywhere under DIR.
"""

from __future__ import annotations

import hashlib
import re
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from lungrt.core.errors import DatasetError, ImageReadError
from lungrt.data.io import is_supported, read_mask, read_xray
from lungrt.core.spec import PreprocessSpec

SPLITS = ("train", "val", "test")
DEFAULT_RATIOS = (4, 3, 3)  # the papers' 4:3:3
MASK_SUFFIXES = ("_mask", "_masks", "_seg", "_label")


@dataclass(frozen=True)
class Pair:
    name: str  # image stem; the patient/file identity used for splitting
    image: Path
    mask: Path

    @property
    def source(self) -> str:
        return source_of(self.name)


@dataclass
class Discovery:
    pairs: list[Pair]
    unmatched_images: list[Path] = field(default_factory=list)
    unmatched_masks: list[Path] = field(default_factory=list)


def source_of(name: str) -> str:
    """Source prefix of a file name (MCUCXR_0001_0 -> MCUCXR), used to stratify splits."""
    m = re.match(r"[A-Za-z]+", name)
    return m.group(0).upper() if m else "OTHER"


def _strip_mask_suffix(stem: str) -> str | None:
    low = stem.lower()
    for suf in MASK_SUFFIXES:
        if low.endswith(suf):
            return stem[: -len(suf)]
    return None


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith(".") and is_supported(p))


def discover_pairs(root: str | Path) -> Discovery:
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"{root}: not a folder")
    img_dir, mask_dir = root / "images", root / "masks"
    if img_dir.is_dir() and mask_dir.is_dir():
        images = {p.stem: p for p in _files(img_dir)}
        masks = {}
        for p in _files(mask_dir):
            masks[_strip_mask_suffix(p.stem) or p.stem] = p
    else:
        images, masks = {}, {}
        for p in _files(root):
            base = _strip_mask_suffix(p.stem)
            if base is not None:
                masks[str(p.parent / base)] = p
            else:
                images[str(p.parent / p.stem)] = p
    pairs = [Pair(Path(k).name, images[k], masks[k]) for k in sorted(images) if k in masks]
    return Discovery(
        pairs=pairs,
        unmatched_images=[images[k] for k in sorted(images) if k not in masks],
        unmatched_masks=[masks[k] for k in sorted(masks) if k not in images],
    )


def _unit_hash(seed: int, name: str) -> str:
    return hashlib.sha256(f"{seed}:{name}".encode()).hexdigest()


def split_pairs(pairs: list[Pair], seed: int = 0, ratios=DEFAULT_RATIOS) -> dict[str, list[Pair]]:
    """Deterministic split by seed and file-name hash, stratified by source prefix.

    Within each source the pairs are ordered by hash and cut by the ratios, so the result does not
    depend on listing order and every source with >= 3 files appears in every split.
    """
    total = float(sum(ratios))
    out: dict[str, list[Pair]] = {s: [] for s in SPLITS}
    by_source: dict[str, list[Pair]] = defaultdict(list)
    for p in pairs:
        by_source[p.source].append(p)
    for group in by_source.values():
        group = sorted(group, key=lambda p: _unit_hash(seed, p.name))
        n = len(group)
        n_train = int(round(n * ratios[0] / total))
        n_val = int(round(n * ratios[1] / total))
        if n >= 3:  # keep every source in every split
            n_train = min(max(n_train, 1), n - 2)
            n_val = min(max(n_val, 1), n - n_train - 1)
        out["train"] += group[:n_train]
        out["val"] += group[n_train : n_train + n_val]
        out["test"] += group[n_train + n_val :]
    for s in SPLITS:
        out[s].sort(key=lambda p: p.name)
    return out


def select_split(root: str | Path, split: str, seed: int = 0) -> list[Pair]:
    if split not in (*SPLITS, "all"):
        raise DatasetError(f"unknown split {split!r}; use one of {SPLITS + ('all',)}")
    pairs = discover_pairs(root).pairs
    if not pairs:
        raise DatasetError(f"{root}: no image/mask pairs found (expected images/ + masks/ or NAME_mask files)")
    return pairs if split == "all" else split_pairs(pairs, seed)[split]


def fingerprint(pairs: list[Pair]) -> str:
    """Hash of the pair names and file sizes: identifies the data a model was trained on."""
    h = hashlib.sha256()
    for p in sorted(pairs, key=lambda p: p.name):
        h.update(f"{p.name}:{p.image.stat().st_size}:{p.mask.stat().st_size};".encode())
    return h.hexdigest()[:16]


def _load_one(pair: Pair, spec: PreprocessSpec, equalize: bool = True) -> tuple[np.ndarray, np.ndarray]:
    small = spec.resize_xray8(read_xray(pair.image))
    image = (spec.equalize8(small) if equalize else small).astype(np.float32) / 255.0
    mask = read_mask(pair.mask).astype(np.float32)
    return image, cv2.resize(mask, (spec.size, spec.size), interpolation=cv2.INTER_AREA)


def load_arrays(pairs: list[Pair], spec: PreprocessSpec, progress=None, equalize: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Prepared images (N, S, S) float32 in [0,1] (before normalisation) and masks (N, S, S)
    float32: the share of each network pixel the gold mask covers. (Thresholded at 0.5, every
    half-covered pixel on the boundary became background: targets shrunk by half a pixel at 512 px,
    so even a perfect model lost 1% recall, Dice 0.994 at best; with the shares, 0.999.)

    equalize=False keeps the resized raw pixels, for augmentation that must happen before the
    spec's equalization (as an abnormality in the patient would)."""
    images = np.empty((len(pairs), spec.size, spec.size), np.float32)
    masks = np.empty((len(pairs), spec.size, spec.size), np.float32)
    with ThreadPoolExecutor(max_workers=4) as pool:
        for i, (im, m) in enumerate(pool.map(lambda p: _load_one(p, spec, equalize), pairs)):
            images[i], masks[i] = im, m
            if progress is not None:
                progress()
    return images, masks


def check_dataset(root: str | Path, seed: int = 0) -> dict:
    """Everything `lungrt data check` reports: pairs, unmatched, unreadable, mask stats, splits."""
    found = discover_pairs(root)
    unreadable: list[dict] = []
    value_kinds: Counter = Counter()
    lung_fracs: list[float] = []
    good: list[Pair] = []
    for p in found.pairs:
        try:
            read_xray(p.image)
            xr = read_xray(p.mask)
        except ImageReadError as e:
            unreadable.append({"file": e.path, "reason": e.reason})
            continue
        raw = xr.gray8
        binary = np.isin(raw, (0, 255)).mean()
        value_kinds["binary 0/255" if binary == 1.0 else "0/255 with soft edges" if binary > 0.9 else "other"] += 1
        lung_fracs.append(float(read_mask(p.mask).mean()))
        good.append(p)
    splits = split_pairs(good, seed)
    return {
        "root": str(root),
        "pairs": len(found.pairs),
        "readable_pairs": len(good),
        "unmatched_images": [str(p) for p in found.unmatched_images],
        "unmatched_masks": [str(p) for p in found.unmatched_masks],
        "unreadable": unreadable,
        "mask_values": dict(value_kinds),
        "lung_fraction": {
            "mean": float(np.mean(lung_fracs)) if lung_fracs else None,
            "min": float(np.min(lung_fracs)) if lung_fracs else None,
            "max": float(np.max(lung_fracs)) if lung_fracs else None,
            "empty_masks": int(sum(f == 0 for f in lung_fracs)),
        },
        "seed": seed,
        "splits": {
            s: {"total": len(v), "by_source": dict(sorted(Counter(p.source for p in v).items()))}
            for s, v in splits.items()
        },
    }


GATE_IMAGES = 48  # validation images that gate builds and CPU choices


def validation_pairs(data: Path | None, limit: int = GATE_IMAGES):
    """Labelled validation images (never test), evenly spaced, for gating; None when no data is given."""
    if data is None:
        return None
    pairs = select_split(data, "val")
    step = max(1, len(pairs) // limit)
    return pairs[::step][:limit]
