"""A simple colour/shape detector for toy images (numpy or torch, [H, W, 3] floats in 0..1).

Objects in the toy world are fully bright saturated colours, backgrounds are dim (toy/scenes.py), so:
- object pixels: max channel > 0.6 and (max - min) > 0.35 (optionally restricted to a region mask);
- colour: the pure colour (red/green/blue/yellow) nearest to the mean object pixel, direction only;
- shape: the toy VAE decodes 8x8 blocks, so shapes are judged at block level: a per-block coverage of
  the detected colour (e.g. red: R - max(G, B)) is compared with the block coverage of circle, square and
  triangle (apex up) rendered at a small grid of centres and sizes around the observed blob (sizes from
  its mass); the shape with the least squared error wins. A template-IoU fallback is kept for
  reference (`classify_shape`).

No torch or ComfyUI needed (numpy + scipy.ndimage).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from .scenes import COLORS, SHAPES

_PURE = np.array([COLORS[c] for c in COLORS], np.float32)
_PURE_N = _PURE / np.linalg.norm(_PURE, axis=1, keepdims=True)
COLOR_LIST = tuple(COLORS)


@dataclass
class Detection:
    color: str | None
    shape: str | None
    area: int  # object pixels in the largest component
    total: int  # object pixels overall
    iou: dict  # template IoU per shape
    bbox: tuple | None  # (y0, y1, x0, x1) inclusive-exclusive


def to_numpy(img) -> np.ndarray:
    if hasattr(img, "detach"):
        img = img.detach().cpu().float().numpy()
    return np.asarray(img, np.float32)


def object_pixels(img, region: np.ndarray | None = None) -> np.ndarray:
    img = to_numpy(img)
    mx, mn = img.max(-1), img.min(-1)
    fg = (mx > 0.6) & ((mx - mn) > 0.35)
    if region is not None:
        fg &= np.asarray(region, bool)
    return fg


def classify_color(pixels: np.ndarray) -> str | None:
    """Nearest pure colour (by direction) to the mean of the pixels [N, 3]."""
    if len(pixels) == 0:
        return None
    m = pixels.mean(0)
    n = np.linalg.norm(m)
    if n < 1e-6:
        return None
    return COLOR_LIST[int(np.argmax(_PURE_N @ (m / n)))]


def _template(shape: str, h: int, w: int) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32) + 0.5
    u, v = xx / w, yy / h  # 0..1
    if shape == "circle":
        return (u - 0.5) ** 2 + (v - 0.5) ** 2 <= 0.25
    if shape == "square":
        return np.ones((h, w), bool)
    if shape == "triangle":
        return np.abs(u - 0.5) <= 0.5 * v
    raise ValueError(shape)


def classify_shape(fg: np.ndarray) -> tuple[str | None, dict, tuple | None, int]:
    lab, n = ndimage.label(fg)
    if n == 0:
        return None, {}, None, 0
    sizes = ndimage.sum(fg, lab, index=np.arange(1, n + 1))
    k = int(np.argmax(sizes)) + 1
    comp = lab == k
    ys, xs = np.nonzero(comp)
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    crop = comp[y0:y1, x0:x1]
    ious = {}
    for s in SHAPES:
        t = _template(s, y1 - y0, x1 - x0)
        ious[s] = float((crop & t).sum() / max(1, (crop | t).sum()))
    return max(ious, key=ious.get), ious, (int(y0), int(y1), int(x0), int(x1)), int(comp.sum())


def block_mean(x: np.ndarray, b: int = 8) -> np.ndarray:
    h, w = x.shape[0] // b, x.shape[1] // b
    x = x[: h * b, : w * b]
    return x.reshape(h, b, w, b, *x.shape[2:]).mean((1, 3))


def color_coverage(img: np.ndarray, color: str) -> np.ndarray:
    """Estimated fraction of each pixel covered by a bright object of `color` (0..1)."""
    p = np.array(COLORS[color], np.float32) > 0.5
    on = img[..., p].min(-1)
    off = img[..., ~p].max(-1)
    return np.clip(on - off, 0.0, 1.0)


_SS = 4  # supersampling per block when rendering candidate shapes


def _render_cov(shape: str, cx: float, cy: float, r: float, nb: int, block: int) -> np.ndarray:
    from .scenes import shape_mask

    k = block / _SS
    m = shape_mask(shape, cx / k, cy / k, r / k, size=nb * _SS).astype(np.float32)
    return m.reshape(nb, _SS, nb, _SS).mean((1, 3))


_AREA = {"circle": np.pi, "square": 4.0, "triangle": 2.0}


_FRONT = (np.array([0.85, 0.92, 1.0, 1.08, 1.15]), (-6, -3, 0, 3, 6))
# behind another object the visible mass understates the size and the visible centroid moves away from the cover
_BEHIND = (np.array([0.85, 0.92, 1.0, 1.08, 1.15, 1.25, 1.35, 1.5]), tuple(range(-12, 13, 3)))


def fit_shape(cov: np.ndarray, block: int = 8, hidden: np.ndarray | None = None) -> tuple[str | None, dict]:
    """Best-fitting shape for a block-level coverage map [nb, nb] (blocks of `block` pixels): per shape the least
    squared error between `cov` and the shape's block coverage rendered on a grid of centres and sizes around the
    blob's centroid and mass.

    `hidden` [nb, nb] 0..1: how much of each block other objects cover (they may be drawn over this one). Each shape
    is then also fitted as lying behind them (its visible coverage is the rendered one times 1 - hidden, over a wider
    grid of sizes and centres) and keeps the better of the two fits: an object partly covered by its neighbour is
    read by what is left of it (two-object training scenes overlap; without this a circle whose side is covered is
    read as a square or a triangle)."""
    nb = cov.shape[0]
    mass = float(cov.sum()) * block * block
    if mass < 64:
        return None, {}
    yy, xx = (np.mgrid[0:nb, 0:nb].astype(np.float32) + 0.5) * block
    my, mx = float((cov * yy).sum() / cov.sum()), float((cov * xx).sum() / cov.sum())
    fits = [(_FRONT, None)]
    if hidden is not None and float(hidden.sum()) > 0:
        fits.append((_BEHIND, 1.0 - np.clip(hidden, 0.0, 1.0)))
    errs = {}
    for s in SHAPES:
        r0 = (mass / _AREA[s]) ** 0.5
        best = np.inf
        for (rs, ds), keep in fits:
            for r in r0 * rs:
                cy0 = my - (r / 3 if s == "triangle" else 0.0)
                for dy in ds:
                    for dx in ds:
                        m = _render_cov(s, mx + dx, cy0 + dy, r, nb, block)
                        e = float((((m if keep is None else m * keep) - cov) ** 2).sum())
                        best = min(best, e)
        errs[s] = best
    return min(errs, key=errs.get), errs


def detect(img, region: np.ndarray | None = None, min_pixels: int = 64, block: int = 8,
           occluders: np.ndarray | None = None) -> Detection:
    """Colour and shape of the bright saturated object, optionally only inside `region` ([H, W] bool).
    `occluders` [H, W] 0..1: the coverage of other objects that may be drawn over this one (`fit_shape`'s
    `hidden`, e.g. `color_coverage` of the other named colours); None reads the object as unhidden.

    Images whose sides are not multiples of `block` are cropped to them for the shape fit."""
    arr = to_numpy(img)
    fg = object_pixels(arr, region)
    total = int(fg.sum())
    if total < min_pixels:
        return Detection(None, None, total, total, {}, None)
    color = classify_color(arr[fg])
    _, _, bbox, area = classify_shape(fg)
    cov = color_coverage(arr, color)
    if region is not None:
        cov = cov * np.asarray(region, np.float32)
    # keep only the largest blob's neighbourhood (8-connected at block level)
    cb = block_mean(cov, block)
    lab, n = ndimage.label(cb > 0.25, structure=np.ones((3, 3)))
    if n > 1:
        sizes = ndimage.sum(cb, lab, index=np.arange(1, n + 1))
        keep = ndimage.binary_dilation(lab == int(np.argmax(sizes)) + 1, structure=np.ones((3, 3)))
        cb = cb * keep
    hidden = None if occluders is None else block_mean(np.asarray(occluders, np.float32), block)
    if cb.shape[0] != cb.shape[1]:
        s = min(cb.shape)
        cb = cb[:s, :s]
        hidden = None if hidden is None else hidden[:s, :s]
    shape, errs = fit_shape(cb, block, hidden)
    return Detection(color, shape, area, total, errs, bbox)
