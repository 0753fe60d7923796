"""Datasets: discover image/mask pairs, split them deterministically, load them for training.

Layouts understood: `DIR/images/NAME.ext` + `DIR/masks/NAME.ext` (mask stems may end in `_mask`),
and `NAME.ext` + `NAME_mask.ext` side by side anywhere under DIR. A `DIR/metadata.csv` with `file` and
`patient` columns makes the split go by patient (several films of one patient never straddle splits).

Every dataset has a mask convention (`lungrt.core.spec.CONVENTIONS`): declared in `DIR/lungrt-dataset.json`
(`{"convention": "whole-lung"}`), known by the folder's name for the sets lungrt was built on, or given by the
caller; `dataset_convention` says which, or None when nothing declares it.
"""

from __future__ import annotations

import csv
import hashlib
import json
import re
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from lungrt.core.errors import DatasetError, ImageReadError
from lungrt.data.io import is_supported, read_mask, read_xray
from lungrt.core.spec import PreprocessSpec, check_convention

SPLITS = ("train", "val", "test")
DEFAULT_RATIOS = (4, 3, 3)  # the papers' 4:3:3
MASK_SUFFIXES = ("_mask", "_masks", "_seg", "_label")
DATASET_FILE = "lungrt-dataset.json"
METADATA_FILE = "metadata.csv"
# the public sets lungrt was built on, by folder name (their READMEs say which convention they draw)
KNOWN_CONVENTIONS = {"cxr-mc-sz": "lung-field", "cxr-covid-v7": "whole-lung"}


@dataclass(frozen=True)
class Pair:
    name: str  # image stem
    image: Path
    mask: Path
    patient: str = ""  # from metadata.csv: the unit of splitting (else the file name is)
    origin: str = ""  # the dataset's own source label, when its file names carry none

    @property
    def source(self) -> str:
        return self.origin or source_of(self.name)

    @property
    def unit(self) -> str:
        return self.patient or self.name


def dataset_convention(root: str | Path, declared: str | None = None) -> str | None:
    """The mask convention of a dataset folder: `declared` (a caller's flag), else its lungrt-dataset.json,
    else its folder's name among the known sets; None when nothing says."""
    if declared:
        return check_convention(declared)
    root = Path(root)
    card = root / DATASET_FILE
    if card.is_file():
        try:
            return check_convention(json.loads(card.read_text())["convention"])
        except (ValueError, KeyError, TypeError, OSError) as e:
            raise DatasetError(f'{card}: no valid "convention" ({e})') from None
    return KNOWN_CONVENTIONS.get(root.resolve().name)


def _patients(root: Path) -> dict[str, str]:
    """image stem -> patient id from DIR/metadata.csv (`file`, `patient` columns), if present."""
    meta = root / METADATA_FILE
    if not meta.is_file():
        return {}
    with open(meta, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows or not {"file", "patient"} <= set(rows[0]):
        return {}
    return {Path(r["file"]).stem: str(r["patient"]).strip() for r in rows if str(r["patient"]).strip()}


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
    patients = _patients(root)
    origin = root.resolve().name.upper() if patients else ""  # hash-like names carry no source prefix
    pairs = [
        Pair(Path(k).name, images[k], masks[k], patients.get(Path(k).name, ""), origin)
        for k in sorted(images)
        if k in masks
    ]
    return Discovery(
        pairs=pairs,
        unmatched_images=[images[k] for k in sorted(images) if k not in masks],
        unmatched_masks=[masks[k] for k in sorted(masks) if k not in images],
    )


def _unit_hash(seed: int, name: str) -> str:
    return hashlib.sha256(f"{seed}:{name}".encode()).hexdigest()


def split_pairs(pairs: list[Pair], seed: int = 0, ratios=DEFAULT_RATIOS) -> dict[str, list[Pair]]:
    """Deterministic split by seed and unit hash (the patient where metadata names one, else the
    file), stratified by source prefix.

    Within each source the units are ordered by hash and cut by the ratios, so the result does not
    depend on listing order, every source with >= 3 units appears in every split, and all films of
    one patient land in the same split.
    """
    total = float(sum(ratios))
    out: dict[str, list[Pair]] = {s: [] for s in SPLITS}
    by_source: dict[str, dict[str, list[Pair]]] = defaultdict(lambda: defaultdict(list))
    for p in pairs:
        by_source[p.source][p.unit].append(p)
    for units in by_source.values():
        group = sorted(units, key=lambda u: _unit_hash(seed, u))
        n = len(group)
        n_train = int(round(n * ratios[0] / total))
        n_val = int(round(n * ratios[1] / total))
        if n >= 3:  # keep every source in every split
            n_train = min(max(n_train, 1), n - 2)
            n_val = min(max(n_val, 1), n - n_train - 1)
        for split, chosen in (
            ("train", group[:n_train]),
            ("val", group[n_train : n_train + n_val]),
            ("test", group[n_train + n_val :]),
        ):
            out[split] += [p for u in chosen for p in units[u]]
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


def load_arrays(
    pairs: list[Pair], spec: PreprocessSpec, progress=None, equalize: bool = True
) -> tuple[np.ndarray, np.ndarray]:
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


# where the known sets come from and under which terms (their READMEs); metadata.csv's `license` column adds
# per-film terms
KNOWN_SOURCES = {
    "cxr-mc-sz": "Montgomery County + Shenzhen chest X-ray sets (U.S. National Library of Medicine; Shenzhen No.3 "
    "People's Hospital): not to be redistributed",
    "cxr-covid-v7": (
        "ieee8023 COVID-19 chest X-ray collection (Cohen et al. 2020) with V7 Labs' lung polygons (CC BY 4.0)"
    ),
}


def data_card(roots: list[Path], seed: int = 0) -> list[dict]:
    """What a model was trained on, for its weights' metadata: per set its name, source and terms, mask
    convention, how it was split (by patient or by file) and how many films (and patients) each split holds."""
    card = []
    for root in roots:
        root = Path(root)
        pairs = discover_pairs(root).pairs
        splits = split_pairs(pairs, seed)
        licenses = Counter()
        meta = root / METADATA_FILE
        if meta.is_file():
            with open(meta, newline="") as f:
                licenses = Counter((r.get("license") or "").strip() or "not stated" for r in csv.DictReader(f))
        card.append(
            {
                "set": root.resolve().name,
                "source": KNOWN_SOURCES.get(root.resolve().name, str(root)),
                "convention": dataset_convention(root),
                "split_by": "patient" if any(p.patient for p in pairs) else "file",
                "seed": seed,
                "licenses": dict(licenses.most_common()),
                "splits": {s: {"films": len(v), "patients": len({p.unit for p in v})} for s, v in splits.items()},
            }
        )
    return card


GATE_IMAGES = 48  # validation images that gate builds and CPU choices


def validation_pairs(data: Path | None, limit: int = GATE_IMAGES):
    """Labelled validation images (never test), evenly spaced, for gating; None when no data is given."""
    if data is None:
        return None
    pairs = select_split(data, "val")
    step = max(1, len(pairs) // limit)
    return pairs[::step][:limit]
