"""Training: Dice + BCE, AdamW with cosine decay to 0.01x, anatomically sensible augmentation,
best checkpoint by validation Dice, resumable, seeded.

A model learns one mask convention (`lungrt.core.spec.CONVENTIONS`). Several datasets may feed it: one of
another convention teaches only what both conventions agree on (`partial_label_weights`), and validation
uses the sets of the model's own convention."""

from __future__ import annotations

import json
import logging
import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from lungrt.data.abnormalities import paint_training
from lungrt.models.checkpoint import ModelInfo, resolve_model, save_checkpoint
from lungrt.core.errors import DatasetError
from lungrt.data.datasets import data_card, dataset_convention, fingerprint, load_arrays, select_split
from lungrt.evaluation.metrics import dice_batch
from lungrt.models import build_model
from lungrt.core.spec import PreprocessSpec, to_gray8
from lungrt.core.progress import progress_bar


FIT_ON = ("train", "train+val")


@dataclass
class TrainConfig:
    model: str = "unet"
    width: int = 16
    size: int = 256
    equalization: str = "histogram"
    epochs: int = 50
    lr: float = 1e-4
    final_lr_ratio: float = 0.01
    weight_decay: float = 1e-4
    batch_size: int = 8
    seed: int = 0
    augment: bool = True
    limit: int = 0  # use only the first N training images (smoke runs)
    device: str = "auto"  # auto: CUDA when available
    # "basic": geometry + exposure after equalization. "robust": wider geometry (incl. anisotropic
    # scale, crops), synthetic abnormalities inside the lung field and detector looks (blur,
    # sharpening, noise, collimation borders), all painted before the spec's equalization.
    recipe: str = "basic"
    abnormality_p: float = 0.5  # robust recipe: share of training images with a painted abnormality
    init: str = ""  # fine-tune: start from these weights (shipped name, checkpoint or run folder)
    # "train": fit on the train split, keep the epoch with the best validation Dice. "train+val": fit on
    # both (75% more images for the shipped weights) and keep the last epoch, since validation is no
    # longer held out; its Dice is still logged, as a fit curve. The test split is never used.
    fit_on: str = "train"
    convention: str = ""  # the mask convention to learn; "" = the (first) dataset's


def bf16_autocast_supported() -> bool:
    """bf16 autocast pays only where oneDNN has native bf16 (AVX-512 BF16 / AMX)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except Exception:
        return False


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("CUDA requested but no CUDA device is available")
    return device


def amp_settings(device: str) -> tuple[str, torch.dtype, bool]:
    """(device type, dtype, enabled): bf16 autocast on CPUs with native bf16, AMP on CUDA (bf16
    where the GPU has it, else fp16 with a gradient scaler)."""
    if device.startswith("cuda"):
        return "cuda", (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16), True
    return "cpu", torch.bfloat16, bf16_autocast_supported()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def dice_bce_loss(logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """BCE + soft Dice; `weight` (0/1 per pixel) leaves out the pixels a label does not decide."""
    if weight is None:
        bce = F.binary_cross_entropy_with_logits(logits, target)
        p, t = torch.sigmoid(logits).flatten(1), target.flatten(1)
    else:
        bce = F.binary_cross_entropy_with_logits(logits, target, weight=weight, reduction="sum")
        bce = bce / weight.sum().clamp_min(1)
        w = weight.flatten(1)
        p, t = torch.sigmoid(logits).flatten(1) * w, target.flatten(1) * w
    dice = (2 * (p * t).sum(1) + 1.0) / (p.sum(1) + t.sum(1) + 1.0)
    return bce + (1 - dice).mean()


def partial_label_weights(shares: np.ndarray, margin: int = 2) -> np.ndarray:
    """Per-pixel weights (N, S, S) for lung-field masks teaching a whole-lung model: the field is lung in
    both conventions, and what lies outside the convex hull of both lungs is not lung in either; inside the
    hull (behind the heart, between the domes) the field mask says nothing about the whole lung: weight 0."""
    weights = np.ones_like(shares, dtype=np.float32)
    kernel = np.ones((2 * margin + 1, 2 * margin + 1), np.uint8)
    for i, share in enumerate(shares):
        lung = (share > 0.5).astype(np.uint8)
        points = cv2.findNonZero(lung)
        if points is None:
            continue
        hull = cv2.fillConvexPoly(np.zeros_like(lung), cv2.convexHull(points), 1)
        unsure = cv2.dilate(hull, kernel).astype(bool) & (share < 0.5)
        weights[i][unsure] = 0.0
    return weights


def _training_sets(data_dirs: list[Path], cfg: "TrainConfig", log) -> tuple[str, list[tuple[Path, str]]]:
    """(the convention to learn, [(dataset, its convention)]); refuses what cannot teach that convention."""
    sets = []
    for root in data_dirs:
        conv = dataset_convention(root)
        if conv is None:
            conv = cfg.convention or "lung-field"
            log(f"{root}: no mask convention declared (lungrt-dataset.json); taken as {conv}")
        sets.append((Path(root), conv))
    target = cfg.convention or sets[0][1]
    for root, conv in sets:
        if conv != target and not (conv, target) == ("lung-field", "whole-lung"):
            raise DatasetError(f"{root}: {conv} masks cannot teach a {target} model (they draw more lung than it)")
    if not any(conv == target for _, conv in sets):
        raise DatasetError(f"no dataset of the {target} convention to validate on")
    return target, sets


def augment_batch(images: torch.Tensor, masks: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Small rotations, scaling, shifts (no flips: the heart sits left) and exposure changes.

    images, masks: (B, 1, S, S) in [0, 1]. Intensity changes mimic other detectors and hospitals.
    """
    b, dev = images.shape[0], images.device
    u = lambda lo, hi: (lo + (hi - lo) * torch.rand(b, generator=gen)).to(dev)  # noqa: E731
    angle = u(-10, 10) * math.pi / 180
    scale = u(0.88, 1.12)
    tx, ty = u(-0.06, 0.06), u(-0.06, 0.06)
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, tx], 1), torch.stack([sin, cos, ty], 1)], 1)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    images = F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    masks = F.grid_sample(masks, grid, mode="bilinear", padding_mode="zeros", align_corners=False)  # shares stay shares
    gamma = torch.exp(u(-0.35, 0.35)).view(b, 1, 1, 1)
    contrast = u(0.8, 1.2).view(b, 1, 1, 1)
    bright = u(-0.08, 0.08).view(b, 1, 1, 1)
    noise = u(0.0, 0.03).view(b, 1, 1, 1) * torch.randn(images.shape, generator=gen).to(dev)
    images = images.clamp(0, 1) ** gamma
    mean = images.mean(dim=(2, 3), keepdim=True)
    images = ((images - mean) * contrast + mean + bright + noise).clamp(0, 1)
    return images, masks


def augment_robust(
    raw: torch.Tensor, masks: torch.Tensor, spec: PreprocessSpec, gen: torch.Generator, abnormality_p: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The robust recipe on raw (un-equalized) [0,1] images (B, 1, S, S): wider geometry, then per
    image an abnormality, a detector look and the spec's own equalization, then mild exposure jitter.
    Returns equalized [0,1] images and masks, like `augment_batch`."""
    b = raw.shape[0]
    u = lambda lo, hi: lo + (hi - lo) * torch.rand(b, generator=gen)  # noqa: E731
    angle = u(-15, 15) * math.pi / 180
    sx, sy = u(0.8, 1.2), u(0.8, 1.2)  # other hospitals' aspect ratios get squashed differently
    tx, ty = u(-0.1, 0.1), u(-0.1, 0.1)
    cos, sin = torch.cos(angle), torch.sin(angle)
    theta = torch.stack([torch.stack([cos / sx, -sin / sx, tx], 1), torch.stack([sin / sy, cos / sy, ty], 1)], 1)
    grid = F.affine_grid(theta, list(raw.shape), align_corners=False)
    fill = raw.mean(dim=(1, 2, 3))
    # pad with each image's mean rather than black, then paint occasional collimation below
    shifted = raw - fill.view(b, 1, 1, 1)
    images = F.grid_sample(shifted, grid, mode="bilinear", padding_mode="zeros", align_corners=False) + fill.view(
        b, 1, 1, 1
    )
    masks = F.grid_sample(masks, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    seeds = torch.randint(0, 2**31 - 1, (b,), generator=gen).tolist()
    out = np.empty(tuple(images.shape), np.float32)
    for i in range(b):
        rng = np.random.default_rng(seeds[i])
        im = images[i, 0].clamp(0, 1).numpy()
        m = masks[i, 0].numpy() > 0.5
        if rng.random() < abnormality_p:
            im = paint_training(im, m, rng)
        im = _detector_look(im, rng)
        out[i, 0] = spec.equalize8(to_gray8(im)).astype(np.float32) / 255.0
    images = torch.from_numpy(out)
    gamma = torch.exp(u(-0.2, 0.2)).view(b, 1, 1, 1)
    return images.clamp(0, 1) ** gamma, masks


def _detector_look(im: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Other detectors and hospitals: blur or sharpening, noise, black/white collimation borders."""
    r = rng.random()
    if r < 0.25:
        im = cv2.GaussianBlur(im, (0, 0), rng.uniform(0.5, 1.5))
    elif r < 0.5:
        blur = cv2.GaussianBlur(im, (0, 0), rng.uniform(1.0, 3.0))
        im = im + rng.uniform(0.3, 1.0) * (im - blur)
    if rng.random() < 0.5:
        im = im + rng.uniform(0.0, 0.04) * rng.standard_normal(im.shape).astype(np.float32)
    if rng.random() < 0.2:
        h, w = im.shape
        value = float(rng.choice([0.0, 1.0]))
        side = rng.integers(4)
        k = int(rng.uniform(0.02, 0.1) * (h if side < 2 else w))
        if side == 0:
            im[:k] = value
        elif side == 1:
            im[h - k :] = value
        elif side == 2:
            im[:, :k] = value
        else:
            im[:, w - k :] = value
    return np.clip(im, 0, 1)


def predict_logits(model: torch.nn.Module, x: np.ndarray, batch_size: int = 16, device: str = "cpu") -> np.ndarray:
    """Logits for normalised inputs (N, 1, S, S), in batches, eval mode."""
    dev_type, dtype, enabled = amp_settings(device)
    model.eval()
    out = []
    with torch.inference_mode(), torch.autocast(dev_type, dtype=dtype, enabled=enabled):
        for i in range(0, len(x), batch_size):
            out.append(model(torch.from_numpy(x[i : i + batch_size]).to(device)).float().cpu().numpy())
    return np.concatenate(out)


def train(
    cfg: TrainConfig,
    data_dir: str | Path | list,
    out_dir: str | Path,
    resume: bool = False,
    log=logging.getLogger(__name__).info,
) -> dict:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    seed_everything(cfg.seed)
    if cfg.fit_on not in FIT_ON:
        raise ValueError(f"fit_on must be one of {FIT_ON}, got {cfg.fit_on!r}")
    data_dirs = [Path(d) for d in (data_dir if isinstance(data_dir, (list, tuple)) else [data_dir])]
    convention, sets = _training_sets(data_dirs, cfg, log)
    spec = PreprocessSpec(size=cfg.size, equalization=cfg.equalization, convention=convention)
    parts, val_pairs, all_pairs = [], [], []
    for root, conv in sets:
        tr, va = select_split(root, "train", cfg.seed), select_split(root, "val", cfg.seed)
        if cfg.limit:
            tr, va = tr[: cfg.limit], va[: max(2, cfg.limit // 2)]
        if cfg.fit_on == "train+val":
            tr = tr + va
        parts.append((tr, conv))
        all_pairs += tr + va  # (with train+val, va twice: the fingerprint the shipped weights carry)
        if conv == convention:
            val_pairs += va
    train_pairs = [p for tr, _ in parts for p in tr]
    with progress_bar() as bar:
        task = bar.add_task("loading X-rays", total=len(train_pairs) + len(val_pairs))
        loaded = [load_arrays(tr, spec, lambda: bar.advance(task), equalize=cfg.recipe != "robust") for tr, _ in parts]
        va_img, va_mask = load_arrays(val_pairs, spec, lambda: bar.advance(task))
    tr_img = np.concatenate([im for im, _ in loaded])
    tr_mask = np.concatenate([m for _, m in loaded])
    tr_weight = np.concatenate(
        [
            partial_label_weights(m) if conv != convention else np.ones_like(m)
            for (_, m), (_, conv) in zip(loaded, parts)
        ]
    )
    partial = any(conv != convention for _, conv in parts)
    va_x = spec.normalize(va_img)[:, None]

    device = resolve_device(cfg.device)
    if cfg.recipe not in ("basic", "robust"):
        raise ValueError(f"recipe must be basic or robust, got {cfg.recipe!r}")
    model = build_model(cfg.model, cfg.width)
    if cfg.init:
        start = resolve_model(cfg.init)
        if (start.info.name, start.info.width) != (cfg.model, cfg.width):
            raise ValueError(
                f"--init {cfg.init}: a {start.info.name} of width {start.info.width}, "
                f"not a {cfg.model} of width {cfg.width}"
            )
        model.load_state_dict(start.model.state_dict())
        log(f"fine-tuning from {cfg.init}")
    model = model.to(device, memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = math.ceil(len(tr_img) / cfg.batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(
        opt, T_max=cfg.epochs * steps_per_epoch, eta_min=cfg.lr * cfg.final_lr_ratio
    )
    history: list[dict] = []
    best, start_epoch, gen_state = -1.0, 0, None
    state_path = out / "resume.pt"
    if resume and state_path.exists():
        st = torch.load(state_path, map_location=device, weights_only=True)
        model.load_state_dict(st["model"])
        opt.load_state_dict(st["optimizer"])
        sched.load_state_dict(st["scheduler"])
        torch.set_rng_state(st["rng"].cpu())
        gen_state = st["gen"].cpu()
        start_epoch, best = int(st["epoch"]), float(st["best"])
        history = json.loads((out / "metrics.json").read_text())["history"]
        log(f"resumed from {state_path} at epoch {start_epoch}")
    dev_type, amp_dtype, use_amp = amp_settings(device)
    scaler = torch.amp.GradScaler(dev_type, enabled=use_amp and amp_dtype == torch.float16)
    gen = torch.Generator().manual_seed(cfg.seed)
    if gen_state is not None:  # resume continues the same augmentation stream
        gen.set_state(gen_state)
    info = ModelInfo(
        cfg.model,
        cfg.width,
        spec,
        fingerprint(all_pairs),
        training={
            **asdict(cfg),
            "convention": convention,
            "device": device,
            "autocast": str(amp_dtype) if use_amp else "off",
            "data": data_card([root for root, _ in sets], cfg.seed),
        },
    )

    shown = "val Dice (seen)" if cfg.fit_on == "train+val" else "best val Dice"
    with progress_bar() as bar:
        task = bar.add_task(
            f"training {cfg.model}", total=cfg.epochs * steps_per_epoch, completed=start_epoch * steps_per_epoch
        )
        for epoch in range(start_epoch, cfg.epochs):
            t0 = time.time()
            model.train()
            order = torch.randperm(len(tr_img), generator=gen).numpy()
            losses = []
            for i in range(0, len(order), cfg.batch_size):
                idx = np.sort(order[i : i + cfg.batch_size])
                x = torch.from_numpy(tr_img[idx])[:, None].to(device)
                y = torch.from_numpy(np.stack([tr_mask[idx], tr_weight[idx]], 1)).to(device)  # share, weight
                if cfg.augment and cfg.recipe == "robust":
                    x, y = augment_robust(x.cpu(), y.cpu(), spec, gen, cfg.abnormality_p)
                    x, y = x.to(device), y.to(device)
                elif cfg.augment:
                    x, y = augment_batch(x, y, gen)
                x = ((x - spec.mean) / spec.std).contiguous(memory_format=torch.channels_last)
                with torch.autocast(dev_type, dtype=amp_dtype, enabled=use_amp):
                    logits = model(x)
                # partial labels: warped weights stay 0/1 by rounding; without them the loss is the one shipped before
                loss = dice_bce_loss(logits.float(), y[:, :1], (y[:, 1:] > 0.5).float() if partial else None)
                opt.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
                sched.step()
                losses.append(loss.item())
                bar.update(
                    task,
                    advance=1,
                    description=(
                        f"{cfg.model} ep {epoch + 1}/{cfg.epochs} loss {np.mean(losses):.4f} {shown} {max(best, 0):.4f}"
                    ),
                )
            val_logits = predict_logits(model, va_x, device=device)
            val_loss = float(dice_bce_loss(torch.from_numpy(val_logits), torch.from_numpy(va_mask[:, None])))
            val_dice = float(dice_batch(val_logits[:, 0] > 0, va_mask).mean())
            history.append(
                {
                    "epoch": epoch + 1,
                    "train_loss": float(np.mean(losses)),
                    "val_loss": val_loss,
                    "val_dice": val_dice,
                    "lr": sched.get_last_lr()[0],
                    "seconds": time.time() - t0,
                }
            )
            if val_dice > best or cfg.fit_on == "train+val":  # train+val: validation is seen, keep the last
                best = val_dice
                info.metrics = {"val_dice_train_res": val_dice, "epoch": epoch + 1, "fit_on": cfg.fit_on}
                save_checkpoint(out / "model.safetensors", model, info)
            _write_run_files(out, cfg, history, best)
            torch.save(
                {
                    "model": model.state_dict(),
                    "optimizer": opt.state_dict(),
                    "scheduler": sched.state_dict(),
                    "rng": torch.get_rng_state(),
                    "gen": gen.get_state(),
                    "epoch": epoch + 1,
                    "best": best,
                },
                state_path,
            )
            log(
                f"epoch {epoch + 1}: train loss {history[-1]['train_loss']:.4f}  val loss {val_loss:.4f}  "
                f"val Dice {val_dice:.4f}  ({history[-1]['seconds']:.0f} s)"
            )
    return {
        "best_val_dice": best,
        "history": history,
        "checkpoint": str(out / "model.safetensors"),
        "fit_images": len(train_pairs),
    }


def _write_run_files(out: Path, cfg: TrainConfig, history: list[dict], best: float) -> None:
    from lungrt.core.plots import plot_loss_curves

    (out / "metrics.json").write_text(
        json.dumps({"config": asdict(cfg), "best_val_dice": best, "history": history}, indent=2)
    )
    plot_loss_curves(history, out / "loss_curves.png", title=f"{cfg.model} (width {cfg.width}, {cfg.size}px)")
