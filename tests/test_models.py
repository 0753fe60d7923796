import numpy as np
import pytest
import torch

from lungrt.models.checkpoint import (
    ModelInfo,
    load_bare_weights,
    load_checkpoint,
    read_info,
    resolve_model,
    save_checkpoint,
)
from lungrt.core.errors import CheckpointError
from lungrt.models import REGISTRY, build_model, count_parameters, gflops_per_image
from lungrt.core.spec import PreprocessSpec
from lungrt.training.train import augment_batch, dice_bce_loss

WIDTH = 4  # tiny models keep these tests fast


@pytest.mark.parametrize("name", sorted(REGISTRY))
@pytest.mark.parametrize("size", [64, 96])
def test_forward_at_two_sizes(name, size):
    model = build_model(name, WIDTH).eval()
    with torch.no_grad():
        y = model(torch.randn(2, 1, size, size))
    assert y.shape == (2, 1, size, size) and torch.isfinite(y).all()


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_parameters_and_flops_are_counted(name):
    m = build_model(name, WIDTH)
    assert count_parameters(m) > 1000
    g64, g128 = gflops_per_image(m, 64), gflops_per_image(m, 128)
    assert g64 > 0 and 3.0 < g128 / g64 < 5.0  # ~4x pixels, attention grows a little faster


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_a_few_training_steps_lower_the_loss(name, phantom_dir):
    from lungrt.data.datasets import discover_pairs, load_arrays

    torch.manual_seed(0)
    spec = PreprocessSpec(size=64)
    images, masks = load_arrays(discover_pairs(phantom_dir).pairs[:8], spec)
    x = torch.from_numpy(spec.normalize(images))[:, None]
    y = torch.from_numpy(masks)[:, None].float()
    model = build_model(name, 8)
    opt = torch.optim.AdamW(model.parameters(), 3e-3)
    losses = []
    for _ in range(15):
        loss = dice_bce_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert np.mean(losses[-3:]) < 0.9 * np.mean(losses[:3]), losses


def test_augmentation_moves_image_and_mask_together():
    gen = torch.Generator().manual_seed(0)
    img = torch.zeros(4, 1, 64, 64)
    img[:, :, 20:40, 20:40] = 1.0
    mask = (img > 0.5).float()
    a_img, a_mask = augment_batch(img.clone(), mask.clone(), gen)
    assert a_mask.min() >= 0 and a_mask.max() <= 1  # covered shares, warped like the image
    for i in range(4):  # the bright square and its mask stay aligned after the warp
        inside = a_img[i][a_mask[i] > 0.5].mean()
        outside = a_img[i][a_mask[i] < 0.5].mean()
        assert inside > outside + 0.3


def _info(name="unet"):
    return ModelInfo(
        name, WIDTH, PreprocessSpec(size=64, equalization="clahe"), data_fingerprint="abc", metrics={"dice": 0.5}
    )


def test_checkpoint_round_trip_is_bit_exact(tmp_path):
    model = build_model("msag-unet", WIDTH)
    for p in model.parameters():  # non-trivial values, BN running stats included
        p.data.normal_()
    path = save_checkpoint(tmp_path / "m.safetensors", model, _info("msag-unet"))
    loaded = load_checkpoint(path)
    for (k, a), (k2, b) in zip(model.state_dict().items(), loaded.model.state_dict().items()):
        assert k == k2 and torch.equal(a, b), k
    assert loaded.spec == PreprocessSpec(size=64, equalization="clahe")
    assert read_info(path).metrics == {"dice": 0.5}


def test_bare_state_dict_loads_weights_only(tmp_path):
    model = build_model("unet", WIDTH)
    torch.save({"state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}}, tmp_path / "w.pth")
    loaded = resolve_model(str(tmp_path / "w.pth"), arch="unet", width=WIDTH)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.model.state_dict().values()))


def test_pickled_code_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"x": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="weights-only"):
        load_bare_weights(tmp_path / "evil.pt", "unet", WIDTH)


def test_mismatched_weights_name_the_keys(tmp_path):
    state = build_model("unet", WIDTH).state_dict()
    state.pop("head.bias")
    state["extra.weight"] = torch.zeros(1)
    state["head.weight"] = torch.zeros(3, 3, 1, 1)
    torch.save(state, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError) as e:
        load_bare_weights(tmp_path / "bad.pt", "unet", WIDTH)
    msg = str(e.value)
    assert "bad.pt" in msg and "head.bias" in msg and "extra.weight" in msg and "head.weight" in msg


def test_plain_safetensors_without_metadata_needs_arch(tmp_path):
    from safetensors.torch import save_file

    save_file(build_model("unet", WIDTH).state_dict(), str(tmp_path / "plain.safetensors"))
    with pytest.raises(CheckpointError, match="--arch"):
        resolve_model(str(tmp_path / "plain.safetensors"))
    assert resolve_model(str(tmp_path / "plain.safetensors"), arch="unet", width=WIDTH).info.name == "unet"
