from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from lungrt.data.datasets import check_dataset, discover_pairs, split_pairs, Pair
from lungrt.core.errors import DatasetError
from lungrt.data.io import write_png


def test_discovers_images_and_masks_folders(phantom_dir):
    found = discover_pairs(phantom_dir)
    assert len(found.pairs) == 24 and not found.unmatched_images and not found.unmatched_masks
    assert all(p.image.stem == p.mask.stem for p in found.pairs)


def test_discovers_name_mask_convention_and_reports_unmatched(tmp_path):
    img = np.full((32, 32), 50, np.uint8)
    for name in ("A_001", "A_002", "B_001"):
        write_png(tmp_path / "sub" / f"{name}.png", img)
    write_png(tmp_path / "sub" / "A_001_mask.png", img)
    write_png(tmp_path / "sub" / "B_001_mask.png", img)
    write_png(tmp_path / "sub" / "C_009_mask.png", img)
    found = discover_pairs(tmp_path)
    assert [p.name for p in found.pairs] == ["A_001", "B_001"]
    assert [p.name for p in found.unmatched_images] == ["A_002.png"]
    assert [p.name for p in found.unmatched_masks] == ["C_009_mask.png"]


def test_not_a_folder(tmp_path):
    with pytest.raises(DatasetError):
        discover_pairs(tmp_path / "missing")


def _pairs(n_a, n_b):
    return [
        Pair(f"{src}_{i:04d}", Path(f"{src}{i}.png"), Path(f"m{src}{i}.png"))
        for src, n in (("MCUCXR", n_a), ("CHNCXR", n_b))
        for i in range(n)
    ]


def test_split_is_433_stratified_and_order_independent():
    pairs = _pairs(138, 566)
    a = split_pairs(pairs, seed=0)
    b = split_pairs(list(reversed(pairs)), seed=0)
    assert {k: [p.name for p in v] for k, v in a.items()} == {k: [p.name for p in v] for k, v in b.items()}
    sizes = {k: len(v) for k, v in a.items()}
    assert sum(sizes.values()) == 704
    assert abs(sizes["train"] - 0.4 * 704) <= 2 and abs(sizes["val"] - 0.3 * 704) <= 2
    for part in a.values():
        assert set(Counter(p.source for p in part)) == {"MCUCXR", "CHNCXR"}
    names = [p.name for v in a.values() for p in v]
    assert len(set(names)) == 704  # disjoint and complete


def test_split_depends_on_seed_and_keeps_tiny_sources():
    pairs = _pairs(3, 40)
    a, b = split_pairs(pairs, 0), split_pairs(pairs, 1)
    assert [p.name for p in a["test"]] != [p.name for p in b["test"]]
    assert all(any(p.source == "MCUCXR" for p in part) for part in a.values())


def test_check_dataset_reports_unreadable_pairs(phantom_dir, tmp_path):
    import shutil

    d = tmp_path / "ds"
    shutil.copytree(phantom_dir, d)
    (d / "masks" / "PHA_0000.png").write_bytes(b"broken")
    report = check_dataset(d)
    assert report["pairs"] == 24 and report["readable_pairs"] == 23
    assert report["unreadable"][0]["file"].endswith("PHA_0000.png")
    assert report["mask_values"] == {"binary 0/255": 23}
    assert sum(s["total"] for s in report["splits"].values()) == 23


def test_training_targets_are_covered_shares_so_the_boundary_does_not_shrink(phantom_dir):
    # A perfect model of the targets, mapped back to native size as infer does, must reproduce the
    # gold mask; thresholding the shares at 0.5 (the old targets) moved every boundary inward
    from lungrt.core.spec import PreprocessSpec
    from lungrt.data.datasets import load_arrays
    from lungrt.data.io import read_mask
    from lungrt.evaluation.metrics import segmentation_metrics

    pairs = discover_pairs(phantom_dir).pairs[:4]
    spec = PreprocessSpec(size=64)
    _, targets = load_arrays(pairs, spec)
    assert targets.dtype == np.float32 and ((targets > 0) & (targets < 1)).any()
    for pair, target in zip(pairs, targets):
        gold = read_mask(pair.mask) > 0
        assert gold.shape[0] >= 2 * spec.size  # a real downscale
        shares = segmentation_metrics(spec.invert_mask(target, gold.shape) > 0, gold)
        halves = segmentation_metrics(spec.invert_mask((target > 0.5).astype(np.float32), gold.shape) > 0, gold)
        assert abs(shares["precision"] - shares["recall"]) < 0.01
        assert halves["recall"] < shares["recall"] - 0.005
