"""Edit-quality metrics, usable on any video (frames [F, H, W, 3], floats in 0..1, numpy or torch).

- Background preservation: PSNR and SSIM (kornia) restricted to the pixels outside the edited region,
  against the source frames; and the same PSNR against the source's VAE round trip (decode(encode(frames)),
  `latent_ref`): what the latent can hold. The toy VAE is an 8x8 block mean, so on striped and dotted backgrounds
  the frames themselves are out of reach: an edit that keeps every latent pixel outside the edit (Blended latent
  with the ground-truth mask) scores 18.5 dB against a striped source's frames and 60 dB (the cap) against its
  round trip. The first measure mixes that loss, the same for every row, into the row's own.
- Temporal consistency: warp error of the edited frames with optical flow estimated on the SOURCE frames
  (OpenCV Farneback, no weights), and the mean frame-to-frame change of the edit relative to the source's.
- Toy only (needs ground-truth masks and the toy detector): edit success (the target region shows the
  requested colour/shape in each frame; for a background edit, the requested background), and leakage
  (other objects changed; pixels outside the edited region changed).
"""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage

from . import detect as det
from .scenes import COLORS, Background

# Preservation PSNR is capped here: 60 dB is about the error of rounding to 8 bits (20 log10(255 sqrt(12)) =
# 58.9 dB), so above it nothing a saved video shows differs; uncapped, a perfectly kept item (inf) would drop
# out of a mean and favour the rows that keep less.
PSNR_CAP = 60.0


def _np(x) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().float().numpy()
    return np.asarray(x, np.float32)


def _keep_mask(frames: np.ndarray, edit_region) -> np.ndarray:
    """[F, H, W] float: 1 where the pixel counts for preservation (outside the edited region)."""
    if edit_region is None:
        return np.ones(frames.shape[:3], np.float32)
    r = _np(edit_region)
    if r.ndim == 2:
        r = np.broadcast_to(r, frames.shape[:3])
    return (r < 0.5).astype(np.float32)


def dilate(masks, pixels: int) -> np.ndarray:
    """Dilate [F, H, W] (or [H, W]) boolean masks by a square of 2*pixels+1 (per frame)."""
    m = np.asarray(masks, bool)
    if pixels <= 0:
        return m.copy()
    st = np.ones((2 * pixels + 1, 2 * pixels + 1), bool)
    if m.ndim == 2:
        return ndimage.binary_dilation(m, structure=st)
    return np.stack([ndimage.binary_dilation(f, structure=st) for f in m])


def masked_psnr(edited, source, edit_region=None) -> float:
    """PSNR (dB, peak 1) over the pixels outside `edit_region` ([F,H,W] or [H,W], True = edited).
    inf when those pixels are identical; nan when there are none."""
    e, s = _np(edited), _np(source)
    keep = _keep_mask(e, edit_region)
    n = keep.sum() * e.shape[-1]
    if n == 0:
        return float("nan")
    mse = float((((e - s) ** 2) * keep[..., None]).sum() / n)
    return float("inf") if mse == 0 else 10.0 * math.log10(1.0 / mse)


def masked_ssim(edited, source, edit_region=None, window: int = 11) -> float:
    """Mean SSIM (kornia's map, window 11) over the pixels outside `edit_region`."""
    import kornia
    import torch

    e, s = _np(edited), _np(source)
    keep = _keep_mask(e, edit_region)
    if keep.sum() == 0:
        return float("nan")
    te = torch.from_numpy(e).permute(0, 3, 1, 2).contiguous()
    ts = torch.from_numpy(s).permute(0, 3, 1, 2).contiguous()
    smap = kornia.metrics.ssim(te, ts, window, max_val=1.0).mean(1).numpy()  # [F, H, W]
    return float((smap * keep).sum() / keep.sum())


def source_flows(source) -> list[np.ndarray]:
    """Farneback flow from frame t to t+1 of the source frames, [H, W, 2] (dx, dy) per pair."""
    import cv2

    s = _np(source)
    gray = [cv2.cvtColor((np.clip(f, 0, 1) * 255).round().astype(np.uint8), cv2.COLOR_RGB2GRAY) for f in s]
    return [
        cv2.calcOpticalFlowFarneback(gray[t], gray[t + 1], None, 0.5, 3, 15, 3, 5, 1.2, 0)
        for t in range(len(gray) - 1)
    ]


def warp_error(edited, source, flows: list[np.ndarray] | None = None, region=None) -> float:
    """Mean over consecutive pairs of the mean squared difference between edited frame t and edited frame t+1
    warped back to t with the source flow t->t+1 (pixels whose flow leaves the image are ignored).
    0 for a static video; small when the edit moves the way the source moves.
    `region` ([F, H, W] bool, frame t's pixels): only those pixels' share of the error (still divided by all valid
    pixels), so that the shares of a region and of its complement add up to the whole."""
    import cv2

    e = _np(edited)
    if len(e) < 2:
        return 0.0
    flows = flows if flows is not None else source_flows(source)
    h, w = e.shape[1:3]
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    errs = []
    for t, fl in enumerate(flows):
        mx, my = xx + fl[..., 0], yy + fl[..., 1]
        warped = cv2.remap(e[t + 1], mx, my, interpolation=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
        valid = (mx >= 0) & (mx <= w - 1) & (my >= 0) & (my <= h - 1)
        if valid.sum() == 0:
            continue
        d = ((warped - e[t]) ** 2).mean(-1) * valid
        if region is not None:
            d = d * np.asarray(region[t], bool)
        errs.append(float(d.sum() / valid.sum()))
    return float(np.mean(errs)) if errs else float("nan")


def warp_error_over(edited, reference, source, flows: list[np.ndarray] | None = None, region=None) -> float:
    """`warp_error` of `edited` minus that of `reference` ([F, H, W, 3] 0..1 both; the source's flows): how much more
    the edit flickers than a clip that changed nothing. With the source's VAE round trip as the reference ("warp_vae"
    of `toy_scores`) it leaves out what every edit of the item scores alike: the flow's errors at occlusions and on
    fine stripes and dots, as the VAE keeps them (0.002-0.060 per test item, mean 0.010: 42-75% of each row's mean
    warp error; toy/RESULTS.md, "Warp error over the VAE round trip"). Row minus row differences per item are
    unchanged. `region`: both shares on those pixels only (`warp_error`)."""
    flows = flows if flows is not None else source_flows(source)
    return warp_error(edited, source, flows, region) - warp_error(reference, source, flows, region)


def edited_region(clip, spec, dilate_px: int = 8) -> np.ndarray:
    """[F, H, W] bool: what the edit may change, the pixels the preservation measures leave out: the edited object's
    region dilated by dilate_px (`target_region`); for a background edit the background with a dilate_px band over
    the objects' outline; for an edit of an object and the background together all but the other objects (shrunk by
    dilate_px), the whole frame when there are none."""
    if spec.target is not None and spec.edit_background != spec.background:
        keep = _others_kept_region(clip, spec, dilate_px)
        return np.ones(clip.masks[:, 0].shape, bool) if keep is None else ~keep
    if spec.target is None:
        return dilate(~clip.masks.any(1), dilate_px)
    return dilate(target_region(clip, spec), dilate_px)


def warp_error_parts(edited, clip, spec, dilate_px: int = 8) -> dict:
    """Where the warp error is: {"inside", "outside"} = the shares of `warp_error` on the edited region
    (`edited_region`) and on the rest, each minus the source's own share there (flow errors: what an edit that
    changed nothing would score), so that 0 is "as steady as the source"."""
    src = clip.frames
    flows = source_flows(src)
    reg = edited_region(clip, spec, dilate_px)
    return {key: warp_error_over(edited, src, src, flows, r) for key, r in (("inside", reg), ("outside", ~reg))}


def frame_change(frames) -> float:
    """Mean absolute frame-to-frame change."""
    f = _np(frames)
    if len(f) < 2:
        return 0.0
    return float(np.abs(f[1:] - f[:-1]).mean())


def relative_frame_change(edited, source) -> float:
    """Mean frame-to-frame change of the edit divided by the source's (1 = moves as much as the source;
    >1 = flicker). inf if the source is static and the edit is not."""
    fe, fs = frame_change(edited), frame_change(source)
    if fs == 0:
        return 0.0 if fe == 0 else float("inf")
    return fe / fs


# --- toy-only ---------------------------------------------------------------------------------------


def detect_background(img, objects_region=None) -> Background | None:
    """The toy background outside `objects_region` ([H,W] bool): plain black/gray/white, <colour>
    stripes/dots, or the gradient. None when unclear."""
    a = _np(img)
    keep = np.ones(a.shape[:2], bool) if objects_region is None else ~np.asarray(objects_region, bool)
    if keep.sum() < 64:
        return None
    mx, mn = a.max(-1), a.min(-1)
    sat = (mx - mn) > 0.15
    colored = sat & keep
    if colored.sum() > 0.08 * keep.sum():
        cname = det.classify_color(a[colored])
        # stripes are vertical: a coloured pixel's column is coloured almost all the way down.
        cols = colored.sum(0).astype(np.float32) / np.maximum(1, keep.sum(0))
        col_frac = float((cols[np.nonzero(colored)[1]]).mean())
        return Background("stripes" if col_frac > 0.75 else "dots", cname)
    n_col = keep.sum(0)
    ok = n_col > 0  # columns with background left (an object may cover a whole column)
    colmean = np.where(ok, np.where(keep, mx, 0.0).sum(0) / np.maximum(1, n_col), np.nan)
    if ok.sum() >= 8:
        xs = np.arange(len(colmean))[ok]
        slope = np.polyfit(xs, colmean[ok], 1)[0] * len(colmean)
        if slope > 0.2:
            return Background("gradient")
    m = float(mx[keep].mean())
    return Background("plain", "black" if m < 0.18 else ("gray" if m < 0.43 else "white"))


def object_success(edited, region_masks, shape: str | None, color: str | None, dilate_px: int = 8) -> dict:
    """Per frame, the detector inside the (dilated) ground-truth region: fractions of frames with the
    requested colour, shape and both."""
    e = _np(edited)
    reg = dilate(region_masks, dilate_px)
    cok = sok = both = 0
    for f in range(len(e)):
        d = det.detect(e[f], reg[f])
        c = color is None or d.color == color
        s = shape is None or d.shape == shape
        cok += c
        sok += s
        both += c and s
    n = max(1, len(e))
    return {"color": cok / n, "shape": sok / n, "both": both / n}


def background_region_excluded(frame, objects_mask, dilate_px: int = 8) -> np.ndarray:
    """[H, W] bool: what a background check leaves out in one edited frame: the ground-truth objects and the
    bright objects the frame actually shows (a model draws an object a few pixels off; the partly covered 8x8
    blocks along its outline are as dim as a pattern's and would be read as the background's colour), dilated."""
    return dilate(np.asarray(objects_mask, bool) | det.object_pixels(frame), dilate_px)


def background_success(edited, objects_masks, expect: Background, dilate_px: int = 8) -> float:
    e = _np(edited)
    m = np.asarray(objects_masks, bool)
    return float(np.mean([detect_background(e[f], background_region_excluded(e[f], m[f], dilate_px)) == expect
                          for f in range(len(e))]))


def changed_fraction(edited, source, region=None, threshold: float = 0.1) -> float:
    """Fraction of pixels (inside `region` if given) whose max-channel absolute change exceeds threshold."""
    d = np.abs(_np(edited) - _np(source)).max(-1) > threshold
    if region is None:
        return float(d.mean())
    r = np.asarray(region, bool)
    return float(d[r].mean()) if r.any() else float("nan")


def target_region(clip, spec) -> np.ndarray:
    """[F, H, W] bool: where the edited object is or should be: its visible source mask united with the requested
    shape drawn on the same motion (a triangle -> square swap fills the square's corners, outside the triangle)."""
    from .scenes import shape_mask

    reg = np.asarray(clip.masks[:, spec.target], bool).copy()
    if spec.expect_shape is None or spec.expect_shape == spec.motions[spec.target].shape:
        return reg
    mo = spec.motions[spec.target]
    f = reg.shape[0]
    for i in range(f):
        o = mo.at(i / max(1, f - 1))
        reg[i] |= shape_mask(spec.expect_shape, o.cx, o.cy, o.r, reg.shape[-1])
    return reg


def toy_scores(edited, clip, spec, dilate_px: int = 8, latent_ref=None) -> dict:
    """All metrics of one toy benchmark item. `clip` is a toy Clip (source frames + masks), `spec` an
    EditSpec; `latent_ref` [F, H, W, 3] 0..1: the source frames' VAE round trip, for "psnr_vae" (the preservation
    PSNR against it instead of the frames) and "warp_vae" (`warp_error_over`); both left out when None."""
    src = clip.frames
    flows = source_flows(src)  # once per item: the warp error and the round trip's use the same
    if spec.target is not None and spec.edit_background != spec.background:
        out = _object_and_background_scores(edited, clip, spec, dilate_px, flows)
        if latent_ref is not None:  # on the same pixels as its psnr_bg: the other objects, nan without any
            reg = edited_region(clip, spec, dilate_px)
            out["psnr_vae"] = min(masked_psnr(edited, latent_ref, reg), PSNR_CAP) if (~reg).any() else float("nan")
            out["warp_vae"] = warp_error_over(edited, latent_ref, src, flows)
        return out
    masks = clip.masks  # [F, n, H, W]
    all_obj = masks.any(1)
    # a global edit (the background changes, objects must stay) is measured on the objects shrunk by dilate_px: the
    # band along their outline mixes object and (changing) background, as the band around an edited object does
    edit_region = edited_region(clip, spec, dilate_px)
    keep_region = all_obj.copy() if spec.target is None else ~edit_region
    target = None if spec.target is None else target_region(clip, spec)
    out = {
        "psnr_bg": min(masked_psnr(edited, src, edit_region), PSNR_CAP),
        "ssim_bg": masked_ssim(edited, src, edit_region),
        "warp_err": warp_error(edited, src, flows),
        "rel_change": relative_frame_change(edited, src),
        "leak": changed_fraction(edited, src, keep_region),
    }
    if latent_ref is not None:
        out["psnr_vae"] = min(masked_psnr(edited, latent_ref, edit_region), PSNR_CAP)
        out["warp_vae"] = warp_error_over(edited, latent_ref, src, flows)
    if spec.target is None:
        out["success"] = background_success(edited, all_obj, spec.edit_background, dilate_px)
        kept = [object_success(edited, masks[:, i], m.shape, m.color, dilate_px)["both"]
                for i, m in enumerate(spec.motions)]
        out["others_kept"] = float(np.mean(kept))
    else:
        s = object_success(edited, target, spec.expect_shape, spec.expect_color, dilate_px)
        out["success"] = s["both"]
        out["success_color"], out["success_shape"] = s["color"], s["shape"]
        others = [i for i in range(masks.shape[1]) if i != spec.target]
        kept = [object_success(edited, masks[:, i], spec.motions[i].shape, spec.motions[i].color, dilate_px)["both"]
                for i in others]
        bg = background_success(edited, all_obj | target, spec.background, dilate_px)
        out["others_kept"] = float(np.mean(kept + [bg]))
    return out


def _others_kept_region(clip, spec, dilate_px: int):
    """[F, H, W] bool: what an object-and-background edit must keep (the other objects, shrunk by dilate_px);
    None when the clip has no other object."""
    others = [i for i in range(clip.masks.shape[1]) if i != spec.target]
    if not others:
        return None
    m = clip.masks[:, others].any(1)
    return m & ~dilate(~m, dilate_px)


def _object_and_background_scores(edited, clip, spec, dilate_px: int, flows=None) -> dict:
    """An edit of one object and of the background together: success when a frame shows both the requested
    object and the requested background; preservation only on the other objects (shrunk by dilate_px), nan when
    there are none."""
    e, src, masks = _np(edited), clip.frames, clip.masks
    all_obj = masks.any(1)
    target = target_region(clip, spec)
    reg = dilate(target, dilate_px)
    ok, parts = [], []
    for f in range(len(e)):
        d = det.detect(e[f], reg[f])
        excluded = background_region_excluded(e[f], all_obj[f] | target[f], dilate_px)
        p = (d.color == spec.expect_color, d.shape == spec.expect_shape,
             detect_background(e[f], excluded) == spec.edit_background)
        parts.append(p)
        ok.append(all(p))
    others = [i for i in range(masks.shape[1]) if i != spec.target]
    keep = _others_kept_region(clip, spec, dilate_px)
    pc, ps, pb = (float(np.mean([p[j] for p in parts])) for j in range(3))
    out = {"success": float(np.mean(ok)), "success_color": pc, "success_shape": ps, "success_background": pb,
           "warp_err": warp_error(edited, src, flows),
           "rel_change": relative_frame_change(edited, src)}
    if keep is not None and keep.any():
        out["psnr_bg"] = min(masked_psnr(edited, src, ~keep), PSNR_CAP)
        out["ssim_bg"] = masked_ssim(edited, src, ~keep)
        out["leak"] = changed_fraction(edited, src, keep)
        out["others_kept"] = float(np.mean([object_success(edited, masks[:, i], spec.motions[i].shape,
                                                           spec.motions[i].color, dilate_px)["both"] for i in others]))
    else:
        out.update(psnr_bg=float("nan"), ssim_bg=float("nan"), leak=float("nan"), others_kept=float("nan"))
    return out


__all__ = [
    "COLORS",
    "masked_psnr",
    "masked_ssim",
    "warp_error",
    "relative_frame_change",
    "frame_change",
    "source_flows",
    "detect_background",
    "object_success",
    "background_success",
    "changed_fraction",
    "toy_scores",
]
