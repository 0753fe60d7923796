"""The two mask conventions (lung field vs whole lung): declared by every dataset, learned by a model, carried by
its spec into every artifact, chosen by the user, refused when they do not match."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from lungrt.build.resolve import open_runner
from lungrt.cli import app
from lungrt.core.errors import DatasetError, LungrtError
from lungrt.core.spec import PreprocessSpec
from lungrt.data.datasets import DATASET_FILE, data_card, dataset_convention, discover_pairs, split_pairs
from lungrt.data.phantoms import write_phantom_dataset
from lungrt.models.checkpoint import load_checkpoint, save_checkpoint, shipped_checkpoint
from lungrt.training.train import TrainConfig, partial_label_weights, train


def test_the_spec_carries_the_convention_and_older_artifacts_are_lung_field():
    assert PreprocessSpec().convention == "lung-field"
    assert PreprocessSpec.from_dict({"size": 256}).convention == "lung-field"  # written before conventions had names
    whole = PreprocessSpec(convention="whole-lung")
    assert PreprocessSpec.from_json(whole.to_json()) == whole
    with pytest.raises(ValueError, match="mask convention"):
        PreprocessSpec(convention="lungs")


def test_datasets_declare_their_convention(tmp_path):
    assert dataset_convention(tmp_path / "cxr-mc-sz") == "lung-field"
    assert dataset_convention(tmp_path / "cxr-covid-v7") == "whole-lung"
    assert dataset_convention(tmp_path) is None
    (tmp_path / DATASET_FILE).write_text(json.dumps({"convention": "whole-lung"}))
    assert dataset_convention(tmp_path) == "whole-lung"
    (tmp_path / DATASET_FILE).write_text(json.dumps({"convention": "both"}))
    with pytest.raises(DatasetError, match="convention"):
        dataset_convention(tmp_path)


def _patient_dataset(folder: Path, patients: int = 12, films: int = 3) -> Path:
    folder = write_phantom_dataset(folder, count=patients * films, size=64, seed=3)
    pairs = discover_pairs(folder).pairs
    with open(folder / "metadata.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["file", "patient", "license"])
        for i, p in enumerate(pairs):
            w.writerow([p.image.name, f"P{i // films}", "CC BY 4.0" if i % 2 else ""])
    (folder / DATASET_FILE).write_text(json.dumps({"convention": "whole-lung"}))
    return folder


def test_a_patient_never_straddles_splits(tmp_path):
    folder = _patient_dataset(tmp_path / "d")
    splits = split_pairs(discover_pairs(folder).pairs, seed=0)
    owners = {}
    for name, pairs in splits.items():
        for p in pairs:
            assert owners.setdefault(p.patient, name) == name, f"{p.patient} in {owners[p.patient]} and {name}"
    assert all(splits[s] for s in ("train", "val", "test"))
    card = data_card([folder])[0]
    assert card["split_by"] == "patient" and card["convention"] == "whole-lung"
    assert sum(s["patients"] for s in card["splits"].values()) == 12
    assert card["licenses"] == {"CC BY 4.0": 18, "not stated": 18}


def test_lung_field_masks_teach_a_whole_lung_model_only_where_both_agree():
    share = np.zeros((1, 64, 64), np.float32)
    share[0, 10:50, 8:26] = 1.0  # the right lung field
    share[0, 10:40, 38:56] = 1.0  # the left, shorter: the heart's notch below it
    w = partial_label_weights(share)[0]
    assert (w[share[0] > 0.5] == 1).all()  # lung in both conventions
    assert w[2, 32] == 1 and w[60, 5] == 1  # far outside both lungs: not lung in either
    assert w[30, 32] == 0 and w[45, 45] == 0  # between the lungs, below the short one: undecided


def test_whole_lung_masks_cannot_teach_a_lung_field_model(tmp_path):
    folder = _patient_dataset(tmp_path / "whole")
    cfg = TrainConfig(model="unet", width=4, size=64, epochs=1, convention="lung-field", augment=False)
    with pytest.raises(DatasetError, match="whole-lung masks cannot teach a lung-field model"):
        train(cfg, [folder], tmp_path / "run", log=lambda *a: None)


def test_a_whole_lung_model_trains_on_both_kinds_and_says_so(tmp_path, phantom_dir):
    whole = _patient_dataset(tmp_path / "whole")
    cfg = TrainConfig(model="unet", width=4, size=64, epochs=1, batch_size=8, augment=False)
    result = train(cfg, [whole, phantom_dir], tmp_path / "run", log=lambda *a: None)  # the first set's convention
    info = load_checkpoint(result["checkpoint"]).info
    assert info.spec.convention == "whole-lung"
    assert [d["convention"] for d in info.training["data"]] == ["whole-lung", None]


def _whole_lung_copy(tiny_checkpoint: Path, tmp_path: Path) -> Path:
    loaded = load_checkpoint(tiny_checkpoint)
    loaded.info.spec = PreprocessSpec(**{**loaded.info.spec.to_dict(), "convention": "whole-lung"})
    return save_checkpoint(tmp_path / "whole.safetensors", loaded.model, loaded.info)


def test_the_resolver_refuses_the_other_convention(tmp_path, tiny_checkpoint):
    whole = _whole_lung_copy(tiny_checkpoint, tmp_path)
    with open_runner(str(whole), backend="torch", convention="whole-lung") as r:
        assert r.spec.convention == "whole-lung"
    with pytest.raises(LungrtError, match="mask convention whole-lung, not lung-field"):
        open_runner(str(whole), backend="torch", convention="lung-field")
    with pytest.raises(LungrtError, match="mask convention must be one of"):
        open_runner(str(whole), backend="torch", convention="whole")
    with open_runner(str(whole), backend="onnxruntime") as r:  # the ONNX variant carries it in its metadata
        assert r.spec.convention == "whole-lung"


def test_shipped_names_pick_the_weights_of_the_convention():
    field = shipped_checkpoint("msag-unet")
    assert field is not None and field.name == "msag-unet.safetensors"
    whole = shipped_checkpoint("msag-unet", "whole-lung")
    if whole is None:
        pytest.skip("no whole-lung msag-unet weights in this package")
    assert load_checkpoint(whole).spec.convention == "whole-lung"


def test_infer_records_and_the_seg_names_the_convention(tmp_path, tiny_checkpoint):
    import pydicom

    from lungrt.data.dicom import write_dicom
    from lungrt.data.phantoms import make_phantom

    whole = _whole_lung_copy(tiny_checkpoint, tmp_path)
    (tmp_path / "in").mkdir()
    write_dicom(tmp_path / "in" / "cxr.dcm", (make_phantom(3, 128).image * 4000).astype(np.uint16))
    res = CliRunner().invoke(
        app,
        [
            "infer",
            str(tmp_path / "in"),
            "--out",
            str(tmp_path / "out"),
            "--model",
            str(whole),
            "--backend",
            "torch",
            "--dicom-seg",
            "--convention",
            "whole-lung",
            "--json",
            str(tmp_path / "s.json"),
        ],
    )
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "s.json").read_text())["convention"] == "whole-lung"
    seg = pydicom.dcmread(next((tmp_path / "out").rglob("*.seg.dcm")))
    assert seg.SeriesDescription.endswith("whole lungs")
    refused = CliRunner().invoke(
        app,
        [
            "infer",
            str(tmp_path / "in"),
            "--out",
            str(tmp_path / "o2"),
            "--model",
            str(whole),
            "--backend",
            "torch",
            "--convention",
            "lung-field",
        ],
    )
    assert refused.exit_code == 2 and "mask convention whole-lung, not lung-field" in refused.output


def test_eval_warns_when_data_and_model_draw_different_lungs(tmp_path, tiny_checkpoint):
    whole = _patient_dataset(tmp_path / "whole")
    res = CliRunner().invoke(app, ["eval", "--model", str(tiny_checkpoint), "--data", str(whole), "--split", "test"])
    assert res.exit_code == 0, res.output
    text = " ".join(res.output.split())
    assert "draws whole-lung masks, the model segments lung-field" in text and "Recall" in res.output
