"""Quality control of every mask: a few numbers per image, and the short reasons to distrust it.

Features are measured on the network's own probability map (the same grid for every backend and
every image size): how much of its own box the lung field fills and its height over its width (sizes
against the lung field's extent, not the image's), right/left balance, fragments, uncertain boundary,
mask at the image border, and where the lung field sits. Thresholds are fitted on the
model's own predictions for the training split and checked on the validation split, so that about
5% of normal validation X-rays are flagged (`fit_thresholds`); they travel with the model in its
checkpoint, ONNX and engine metadata (`ModelInfo.qc`), so every backend flags the same way.
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass

import cv2
import numpy as np

from lungrt.backends.second_opinion import COVER, check_reference, reference_record
from lungrt.inference.shape import ShapeModel, pair_landmarks, shape_features_many

# feature -> (reason when below the low bound, reason when above the high bound); None: not checked
# Sizes are measured against the lung field's own extent (its 1-99 % box: the rib cage's interior,
# the thorax as the mask shows it), not the image: a tighter collimation, a padded or smaller film
# leaves them alone. Only where the lung field sits (centroid) and whether it touches the image's
# edge are about the framing, by intent: an off-centre or cut-off film is what they report.
FEATURES: dict[str, tuple[str | None, str | None]] = {
    "box_fill": ("sparse_lungs", "box_like"),  # lung pixels per pixel of the lung field's box
    "lr_balance": ("unbalanced", None),
    "components": (None, "fragmented"),
    "uncertain_fraction": (None, "uncertain"),
    "confidence": ("low_confidence", None),
    "border_fraction": (None, "at_border"),
    "centroid_x": ("off_centre", "off_centre"),
    "centroid_y": ("off_centre", "off_centre"),
    "aspect": ("odd_shape", "odd_shape"),  # the lung field's height over its width
    # lungs end below in the narrow costophrenic tips and the heart's notch; a lung field as wide at
    # its lowest tenth as at its widest row is upside down, or its bases are cut off by the film's edge
    "base_width": (None, "wide_base"),
    # the statistical shape model's verdict (lungrt.inference.shape), when the model carries one: a
    # pair of lung fields far from every plausible pair (Mahalanobis distance; scale-free, unlike the
    # Dice against the plausible fit, which is reported but falls with the lungs' size in pixels)
    "shape_distance": (None, "implausible_shape"),
    # the second opinion (`SecondOpinionRunner`, opt-in): the share of the same architecture's whole-lung mask
    # that this lung-field mask covers. ~0.8 on a clean film (the lung behind the heart is outside the lung-field
    # convention); lower where the mask stops short of lung that disease made opaque, which no feature of the
    # mask alone sees. Measured only when the reference ran; checked only against a bound fitted with it.
    COVER: ("stops_short", None),
}
# of the mask's area: smaller specks are not counted as fragments (0.2 % of a film whose lungs fill
# a quarter of it, as this was when measured against the image)
MIN_COMPONENT = 0.0075

# Used only by models that carry no fitted thresholds (say so in the report): wide, generic bounds.
GENERIC = {
    "box_fill": [0.2, 0.95],
    "lr_balance": [0.2, None],
    "components": [None, 4.0],
    "uncertain_fraction": [None, 0.5],
    "border_fraction": [None, 0.1],
}


_WARNED: set[tuple[str, ...]] = set()


@dataclass
class QCThresholds:
    bounds: dict[str, list[float | None]]
    fitted_on: str = "generic defaults (not fitted to this model)"
    false_alarm_val: float | None = None  # share of validation images flagged at fit time
    margin: dict[str, float] | float | None = None  # per feature: how far past the training extremes (see _bounds_at)
    shape: ShapeModel | None = None  # the lung fields' statistical shape model (training-split masks)
    # the whole-lung weights `whole_lung_cover` was fitted with: {"model", "convention", "weights_hash"}, or None
    reference: dict | None = None

    def to_dict(self) -> dict:
        out = {
            "bounds": self.bounds,
            "fitted_on": self.fitted_on,
            "false_alarm_val": self.false_alarm_val,
            "margin": self.margin,
        }
        if self.reference is not None:
            out["second_opinion"] = self.reference
        return {**out, "shape_model": self.shape.to_dict()} if self.shape is not None else out

    @classmethod
    def from_dict(cls, d: dict | None) -> "QCThresholds":
        if not d or "bounds" not in d:
            return cls(dict(GENERIC))
        stale = tuple(sorted(set(d["bounds"]) - set(FEATURES)))
        if stale and stale not in _WARNED:  # an artifact exported by an older lungrt (once: infer reads it per image)
            _WARNED.add(stale)
            logging.getLogger(__name__).warning(
                "QC thresholds for features this lungrt no longer measures (%s) are not checked; "
                "rebuild or re-export the model to re-fit them",
                ", ".join(stale),
            )
        return cls(
            {k: list(v) for k, v in d["bounds"].items()},
            d.get("fitted_on", "?"),
            d.get("false_alarm_val"),
            d.get("margin"),
            ShapeModel.from_dict(d.get("shape_model")),
            d.get("second_opinion"),
        )


_PARSED: dict[int, tuple[dict, QCThresholds]] = {}


def thresholds_of(qc: dict | None) -> QCThresholds:
    """`QCThresholds.from_dict`, parsed once per thresholds dict: infer reads a runner's for every
    image (0.1 ms each, mostly the shape model's arrays). The dict is held so its id is not reused;
    a model's thresholds are replaced as a whole (`ModelInfo.qc = ...`), never edited in place."""
    if qc is None:
        return QCThresholds.from_dict(None)
    held = _PARSED.get(id(qc))
    if held is None or held[0] is not qc:
        if len(_PARSED) >= 8:
            _PARSED.clear()
        held = _PARSED[id(qc)] = (qc, QCThresholds.from_dict(qc))
    return held[1]


def features(
    prob_small: np.ndarray,
    shape: ShapeModel | None = None,
    image_shape: tuple[int, int] | None = None,
    reference: np.ndarray | None = None,
) -> dict[str, float]:
    """QC numbers of one network-resolution probability map (S, S); with a shape model, also how
    plausible the mask's pair of lung fields is (`shape.shape_features`). `image_shape`: the (h, w)
    of the image it was computed from, which the network saw squeezed to a square: heights and
    widths are compared in the image's own proportions (a tighter crop is not a squatter lung).
    `reference`: the whole-lung weights' probabilities of the same input (the second opinion)."""
    return features_many([prob_small], shape, [image_shape], None if reference is None else [reference])[0]


def features_many(
    probs,
    shape: ShapeModel | None = None,
    image_shapes: list[tuple[int, int] | None] | None = None,
    references=None,
) -> list[dict[str, float]]:
    """`features` of a batch of probability maps: the shape fits run together (one fit's cost)."""
    maps = [np.asarray(p, np.float32).reshape(p.shape[-2:]) for p in probs]
    masks = [(p > 0.5).astype(np.uint8) for p in maps]
    stretches = [s[0] / s[1] if s else 1.0 for s in (image_shapes or [None] * len(maps))]
    feats = [_mask_features(p, m, st) for p, m, st in zip(maps, masks, stretches)]
    if shape is not None:
        for f, (plausibility, _) in zip(feats, shape_features_many(masks, shape, stretches)):
            f.update(plausibility)
    if references is not None:
        for f, m, ref in zip(feats, masks, references):
            f[COVER] = whole_lung_cover(m, ref)
    return feats


def whole_lung_cover(mask: np.ndarray, reference: np.ndarray) -> float:
    """The share of the reference (whole-lung) mask inside `mask`, both on the network's grid; 1.0 when the
    reference sees no lung (nothing for the lung-field mask to fall short of: the other flags speak then)."""
    whole = np.asarray(reference, np.float32).reshape(mask.shape) > 0.5
    n = int(np.count_nonzero(whole))
    return float(np.count_nonzero(whole & (mask > 0))) / n if n else 1.0


def _mask_features(p: np.ndarray, m: np.ndarray, stretch: float = 1.0) -> dict[str, float]:
    h, w = p.shape
    area = cv2.countNonZero(m)
    if area == 0:
        return {
            "box_fill": 0.0,
            "lr_balance": 0.0,
            "components": 0.0,
            "uncertain_fraction": 1.0,
            "confidence": 0.0,
            "border_fraction": 0.0,
            "centroid_x": 0.5,
            "centroid_y": 0.5,
            "aspect": 0.0,
            "base_width": 0.0,
        }
    sizes = component_sizes(m)
    big = np.argsort(-sizes)[:2]
    two = sizes[big]
    balance = float(two.min() / two.max()) if len(two) == 2 else 0.0
    uncertain = float(cv2.countNonZero(cv2.compare(p, 0.1, cv2.CMP_GT) & cv2.compare(p, 0.9, cv2.CMP_LT))) / area
    inner = cv2.countNonZero(m[2:-2, 2:-2])
    # the mask's pixel coordinates summarised by their row and column counts: the same percentiles
    # and means as over np.nonzero's coordinates, without sorting every lung pixel
    rows_w = cv2.reduce(m, 1, cv2.REDUCE_SUM, dtype=cv2.CV_32S).ravel()
    cols_h = cv2.reduce(m, 0, cv2.REDUCE_SUM, dtype=cv2.CV_32S).ravel()
    top, bottom = int(percentile_of_counts(rows_w, 2)), int(percentile_of_counts(rows_w, 98))
    tenth = max(int(round(0.1 * (bottom - top))), 1)
    width = percentile_of_counts(cols_h, 99) - percentile_of_counts(cols_h, 1)
    height = percentile_of_counts(rows_w, 99) - percentile_of_counts(rows_w, 1)
    return {
        "box_fill": area / ((width + 1) * (height + 1)),
        "lr_balance": balance,
        "components": float(np.count_nonzero(sizes >= MIN_COMPONENT * area)),
        "uncertain_fraction": uncertain,
        "confidence": float(cv2.mean(p, mask=m)[0]),
        "border_fraction": float(area - inner) / area,
        "centroid_x": float(np.dot(cols_h, np.arange(w)) / area) / w,
        "centroid_y": float(np.dot(rows_w, np.arange(h)) / area) / h,
        "aspect": (height + 1) / (width + 1) * stretch,
        "base_width": float(rows_w[bottom - tenth + 1 : bottom + 1].mean())
        / max(float(rows_w[top : bottom + 1].max()), 1.0),
    }


def component_sizes(m: np.ndarray) -> np.ndarray:
    """Pixel count of each 8-connected component of a 0/1 mask (background left out). Labels in
    16 bits counted by OpenCV's histogram where they fit (8-connected components are at most one
    per 2x2 block): 45 us at 256 px, where NumPy's bincount of int32 labels took 95 and OpenCV's
    WithStats 400."""
    h, w = m.shape
    if ((h + 1) // 2) * ((w + 1) // 2) < 65535:
        n, labels = cv2.connectedComponents(m, connectivity=8, ltype=cv2.CV_16U)
        return cv2.calcHist([labels], [0], None, [n], [0, n]).ravel()[1:].astype(np.int64)
    n, labels = cv2.connectedComponents(m, connectivity=8)
    return np.bincount(labels.ravel(), minlength=n)[1:]


def percentile_of_counts(counts: np.ndarray, q: float) -> float:
    """np.percentile (linear) of the values 0..len-1, each repeated counts[v] times."""
    cum = np.cumsum(counts)
    pos = q / 100.0 * (int(cum[-1]) - 1)
    lo = int(np.floor(pos))
    a, b = np.searchsorted(cum, [lo, min(lo + 1, int(cum[-1]) - 1)], side="right")
    return float(a + (b - a) * (pos - lo))


def flags(feats: dict[str, float], thresholds: QCThresholds) -> list[str]:
    """Short reasons, in a fixed order, each once."""
    out: list[str] = []
    for name, (lo, hi) in thresholds.bounds.items():
        v = feats.get(name)
        if v is None or name not in FEATURES:
            continue
        low_reason, high_reason = FEATURES[name]
        reason = low_reason if lo is not None and v < lo else high_reason if hi is not None and v > hi else None
        if reason and reason not in out:
            out.append(reason)
    return out


def verdict(feats: dict[str, float], thresholds: QCThresholds) -> str:
    return ";".join(flags(feats, thresholds)) or "ok"


def _bounds_at(
    train: list[dict], margins: dict[str, float], q: float = 0.005, min_spread: dict[str, float] | None = None
) -> dict[str, list[float | None]]:
    """Per-feature bounds: the training predictions' q and 1-q quantiles, widened by that feature's
    margin times their 5-95% spread (282 training images cannot pin the extremes down on their own),
    or `min_spread`'s for that feature where larger (a spread of zero: no margin widens it)."""
    bounds = {}
    for name, (low_reason, high_reason) in FEATURES.items():
        if name not in train[0]:  # the shape features, for a model without a shape model
            continue
        values = np.array([f[name] for f in train], np.float64)
        spread = float(np.quantile(values, 0.95) - np.quantile(values, 0.05))
        spread = max(spread, (min_spread or {}).get(name, 0.0))
        lo = float(np.quantile(values, q)) - margins[name] * spread if low_reason else None
        hi = float(np.quantile(values, 1 - q)) + margins[name] * spread if high_reason else None
        if name == "components" and hi is not None:
            hi = max(hi, 2.0)  # two lungs are never a fragment
        bounds[name] = [lo, hi]
    return bounds


def flagged_share(feats: list[dict], thresholds: QCThresholds) -> float:
    return float(np.mean([bool(flags(f, thresholds)) for f in feats])) if feats else 0.0


MARGINS = (0.0, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0)


def fit_thresholds(
    train: list[dict],
    val: list[dict] | dict[str, list[dict]],
    target: float = 0.05,
    description: str = "",
    min_spread: dict[str, float] | None = None,
) -> QCThresholds:
    """Bounds fitted on `train`, each feature's margin widened only as far as `val` needs: from the
    training extremes, the widening that clears the most validation false alarms per margin step is
    taken (one feature, else two together: an image flagged twice) until at most `target` of `val`
    is flagged, or no widening clears any; then every margin is narrowed back as far as the target (or
    the share reached, where the target was not) allows.
    `val` may be groups (the same images framed otherwise, `REFRAMINGS`): then every group must stay
    within `target`, not only all of them pooled, and `false_alarm_val` is the worst group's share.

    One margin shared by every feature let the flags no margin can quieten (a lung touching the
    image border has a spread of zero) use up the false-alarm budget and widen every other bound;
    per feature, the bounds that flag few validation images (upside down, say) stay tight.
    `min_spread` (`_bounds_at`) lets such a flag widen too (measured in benchmarks/qc_border_floor.py; not used
    by the shipped fits)."""
    groups = val if isinstance(val, dict) else {"validation": val}

    def at(steps: dict[str, int]) -> tuple[QCThresholds, dict[str, float]]:
        margins = {name: MARGINS[i] for name, i in steps.items()}
        cand = QCThresholds(_bounds_at(train, margins, min_spread=min_spread), description, None, margins)
        shares = {g: flagged_share(feats, cand) for g, feats in groups.items()}
        cand.false_alarm_val = max(shares.values())
        return cand, shares

    def cleared(before: dict[str, float], after: dict[str, float]) -> float:  # in the groups over the target
        return sum(before[g] - after[g] for g in before if before[g] > target)

    steps = dict.fromkeys((name for name in FEATURES if name in train[0]), 0)
    best, shares = at(steps)
    while best.false_alarm_val > target:
        for together in (1, 2):
            gains = []
            for wider in _widenings(steps, together):
                cand, cand_shares = at({**steps, **wider})
                gained, cost = cleared(shares, cand_shares), sum(wider[n] - steps[n] for n in wider)
                if gained > 0:
                    gains.append((gained / cost, -cost, cand, cand_shares, wider))
            if gains:
                break
        if not gains:
            break
        *_, best, shares, wider = max(gains, key=lambda g: g[:2])
        steps.update(wider)
    # where no widening gets there (a flag no margin quietens), still narrow back what did not help
    return _narrow_back(steps, lambda st: at(st)[0], max(target, best.false_alarm_val))


def _narrow_back(steps: dict[str, int], at, target: float) -> QCThresholds:
    """The greedy widening overshoots (a step, or a pair widened together, can clear more than the
    target asked for): narrow each margin back a step at a time while `val` stays within `target`,
    the narrowing that adds the fewest validation flags first, the widest margin first among equals."""
    best = at(steps)
    while True:
        options = []
        for name in steps:
            if steps[name]:
                narrower = {**steps, name: steps[name] - 1}
                cand = at(narrower)
                if cand.false_alarm_val <= target:
                    options.append((cand.false_alarm_val, -steps[name], name, cand, narrower))
        if not options:
            return best
        *_, best, steps = min(options, key=lambda o: o[:3])


def _widenings(steps: dict[str, int], together: int):
    """Each way to widen `together` features' margins to one of MARGINS' steps."""
    for names in itertools.combinations(steps, together):
        for j in range(1, len(MARGINS)):
            wider = {n: max(steps[n], j) for n in names}
            if all(wider[n] > steps[n] for n in names):
                yield wider


# The same film framed otherwise (a tighter or looser collimation, another detector's resolution):
# thresholds are checked on validation images as they come and re-framed, so that framing alone
# does not spend the false-alarm budget (the shape features are framing-free by construction).
REFRAMINGS = ("padded", "cropped", "downsampled")


def reframe(image: np.ndarray, how: str, lungs: np.ndarray | None = None) -> np.ndarray:
    """`image` (any dtype, 2-D) padded by 1/8 of its size on each side (black), cropped by up to
    1/16 at the sides and below (the apices kept; with the reference `lungs` mask, never closer than
    1 % of the size to them: a tighter framing of a clean film, not a cut through its lungs), or
    down-sampled to 224/256 of its size."""
    h, w = image.shape
    if how == "padded":
        return np.pad(image, ((h // 8, h // 8), (w // 8, w // 8)))
    if how == "cropped":
        bottom, left, right = h // 16, w // 16, w // 16
        if lungs is not None and lungs.any():
            ys, xs = np.nonzero(lungs)
            bottom = max(0, min(bottom, h - 1 - int(ys.max()) - h // 100))
            left = max(0, min(left, int(xs.min()) - w // 100))
            right = max(0, min(right, w - 1 - int(xs.max()) - w // 100))
        return image[: h - bottom, left : w - right]
    if how == "downsampled":
        return cv2.resize(image, (w * 224 // 256, h * 224 // 256), interpolation=cv2.INTER_AREA)
    raise ValueError(f"reframing must be one of {REFRAMINGS}")


def collect_features(
    runner,
    pairs,
    batch_size: int = 8,
    shape: ShapeModel | None = None,
    framing: str | None = None,
    reference=None,
) -> list[dict[str, float]]:
    """QC features of a runner's predictions on labelled pairs (their images only), optionally
    re-framed (`reframe`); with the `reference` (whole-lung) runner, `whole_lung_cover` too."""
    from lungrt.evaluation.evaluate import batched, load_samples

    out = []
    for batch in batched(load_samples(pairs, runner.spec), batch_size):
        images = [reframe(s.xray.gray8, framing, s.gold) if framing else s.xray.gray8 for s in batch]
        x = np.stack([runner.spec.apply(im) if framing else s.tensor for im, s in zip(images, batch)])
        refs = reference.run(x) if reference is not None else None
        out += features_many(runner.run(x), shape, [im.shape for im in images], refs)
    return out


def fit_shape_model(pairs, size: int) -> ShapeModel:
    """The shape model of `pairs`' reference masks at the network's size (size x size)."""
    from lungrt.data.io import read_mask

    shapes = []
    for pair in pairs:
        mask = cv2.resize(read_mask(pair.mask).astype(np.uint8), (size, size), interpolation=cv2.INTER_NEAREST)
        points = pair_landmarks(mask)
        if points is not None:
            shapes.append(points)
    return ShapeModel.fit(shapes, f"{len(shapes)} training-split reference masks at {size} px")


def well_segmented(runner, pairs, min_recall: float = 0.7, batch_size: int = 8) -> list:
    """The pairs whose prediction holds at least `min_recall` of the reference lung (at the network's size): the
    clean films a false-alarm budget is about. A mask that misses more is what QC must flag, not a false alarm."""
    from lungrt.evaluation.evaluate import batched, load_samples

    kept = []
    for batch in batched(list(zip(pairs, load_samples(pairs, runner.spec))), batch_size):
        probs = runner.run(np.stack([s.tensor for _, s in batch]))
        for (pair, s), p in zip(batch, probs):
            size = runner.spec.size
            gold = cv2.resize(s.gold.astype(np.uint8), (size, size), interpolation=cv2.INTER_AREA) > 0
            pred = p.reshape(size, size) > 0.5
            if gold.sum() and (pred & gold).sum() / gold.sum() >= min_recall:
                kept.append(pair)
    return kept


def fit_for_model(
    runner, train_pairs, val_pairs, target: float = 0.05, min_recall: float | None = 0.7, reference=None
) -> QCThresholds:
    """Thresholds for this model: the shape model from the training split's reference masks, the
    bounds fitted on its training-split predictions and checked on validation, re-framed too. With
    `min_recall`, the validation films whose masks miss more of the lung are left out of the false-alarm
    budget (they are what the flags are for). With the `reference` runner (the same architecture's
    whole-lung weights), `whole_lung_cover` is fitted with the others, under the same budget, and the
    thresholds name the reference's weights (`SecondOpinionRunner` refuses any other)."""
    if reference is not None:
        check_reference(runner, reference)
    if min_recall is not None:
        val_pairs = well_segmented(runner, val_pairs, min_recall)
    shape = fit_shape_model(train_pairs, runner.spec.size)

    def feats(pairs, framing=None):
        return collect_features(runner, pairs, shape=shape, framing=framing, reference=reference)

    train = feats(train_pairs)
    val = {"as it comes": feats(val_pairs)}
    for how in REFRAMINGS:
        val[how] = feats(val_pairs, how)
    clean = f" well-segmented (recall >= {min_recall:g})" if min_recall is not None else ""
    second = f"; with the second opinion of {reference.info.name} ({reference.spec.convention})" if reference else ""
    fitted = fit_thresholds(
        train,
        val,
        target,
        f"{len(train)} training-split predictions; checked on {len(val_pairs)}"
        f"{clean} validation images as they come and {', '.join(REFRAMINGS)}; "
        f"target false-alarm rate {target:.0%} in each{second}",
    )
    fitted.shape = shape
    if reference is not None:
        fitted.reference = reference_record(reference)
    return fitted
