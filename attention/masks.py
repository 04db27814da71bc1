"""Blend masks from cross-attention maps (FateZero's SpatialBlender / P2P's LocalBlend, own code).

The recipe (FateZero `spatial_blend.py`, see ../../shared/reference/algorithms.md §1.4):

1. take the cross-attention maps of the chosen word tokens and **sum over the tokens**,
2. **average over heads and over the layers** that are used (FateZero: the five 16x16 layers of SD1.5
   at 512x512, i.e. the layers whose query map is 4x smaller than the latent),
3. 3x3 **max-pool** (stride 1, padding 1) per frame,
4. **resize** to the target resolution (nearest, as the reference),
5. **normalise per frame** by the frame's maximum,
6. **threshold** (`> threshold`; 0.3 in the papers' local edits).

Steps 1-2 are linear, so averaging the heads first (what `cross_attention_mask` takes) gives exactly the
reference's mean over the heads x layers maps (all layers used have the same head count). Maps of
layers with different resolutions are resized (bilinear) to the largest of them before averaging — the
reference never mixes resolutions; this only matters for models without a 16x16 level.

Helpers for users of masks (also used by other methods of the pack): `dilate`, `temporal_smooth`,
`union`. This module does not import ComfyUI.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


def _as_hw(hw) -> tuple[int, int]:
    if isinstance(hw, int):
        return hw, hw
    h, w = hw
    return int(h), int(w)


def word_map(maps: Sequence[torch.Tensor], hw_list: Sequence, token_indices: Sequence[int],
             token_weights: Sequence[float] | None = None) -> torch.Tensor:
    """Sum over the word tokens and average over layers: -> [F, h, w] (float32), before pooling.

    `maps[i]` is a head-averaged cross-attention map [F, Nq_i, T] (Nq_i = h_i * w_i, T = text tokens);
    a per-head map [F, heads, Nq, T] is accepted too and averaged over its heads.
    """
    if len(maps) == 0:
        raise ValueError("no cross-attention maps to build a mask from (no layer of the chosen resolution was recorded)")
    if len(maps) != len(hw_list):
        raise ValueError(f"{len(maps)} maps but {len(hw_list)} (h, w) entries")
    idx = [int(i) for i in token_indices]
    if not idx:
        raise ValueError("no token indices given for the mask")
    hws = [_as_hw(hw) for hw in hw_list]
    target = max(hws, key=lambda s: s[0] * s[1])
    acc = None
    for m, (h, w) in zip(maps, hws):
        m = m.float()
        if m.ndim == 4:  # per-head [F, heads, Nq, T]
            m = m.mean(1)
        if m.ndim != 3 or m.shape[1] != h * w:
            raise ValueError(f"cross-attention map of shape {list(m.shape)} does not match its query map {h}x{w}")
        if max(idx) >= m.shape[-1]:
            raise ValueError(f"token index {max(idx)} is beyond the {m.shape[-1]} text tokens of the map")
        cols = m[..., idx]
        if token_weights is not None:
            cols = cols * torch.as_tensor(list(token_weights), dtype=cols.dtype, device=cols.device)
        s = cols.sum(-1).reshape(m.shape[0], 1, h, w)
        if (h, w) != target:
            s = F.interpolate(s, size=target, mode="bilinear", align_corners=False)
        acc = s if acc is None else acc + s
    return (acc / len(maps))[:, 0]


def normalise_per_frame(m: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Divide every frame [F, H, W] by its maximum (frames that are all zero stay zero)."""
    peak = m.flatten(1).amax(1).clamp_min(eps).reshape(-1, 1, 1)
    return m / peak


def soft_mask(word_maps: torch.Tensor, out_hw, pool: bool = True, mode: str = "nearest") -> torch.Tensor:
    """Pool (3x3 max), resize to `out_hw` and normalise per frame: [F, h, w] -> [F, H, W] in [0, 1]."""
    x = word_maps.float().unsqueeze(1)
    if pool:
        x = F.max_pool2d(x, kernel_size=3, stride=1, padding=1)
    out_hw = _as_hw(out_hw)
    if tuple(x.shape[-2:]) != out_hw:
        kwargs = {} if mode == "nearest" else {"align_corners": False}
        x = F.interpolate(x, size=out_hw, mode=mode, **kwargs)
    return normalise_per_frame(x[:, 0])


def cross_attention_mask(maps: Sequence[torch.Tensor], hw_list: Sequence, token_indices, out_hw,
                         threshold: float | None = 0.3, pool: bool = True,
                         token_weights: Sequence[float] | None = None) -> torch.Tensor:
    """FateZero's blend mask: [F, H, W], 1.0 where the words are (float 0/1; soft map if threshold is None).

    maps: one head-averaged cross-attention map [F, Nq, T] per layer (or per-head [F, heads, Nq, T]);
    hw_list: the (h, w) query map of each layer; token_indices: the text-token positions of the words
    (BOS = 0, as in the 77-token context); out_hw: the resolution of the mask; threshold: the mask is
    `normalised > threshold`.

    Phrases: `token_indices` may also be a list of phrases (a list of position lists, e.g. [[2, 3], [5, 6]] for
    "red hat, green dots"); each phrase is then masked on its own (summed over its tokens, pooled, normalised
    per frame) and the mask is their union (the pixel-wise maximum of the normalised maps, then the threshold).
    A single phrase is exactly the reference's recipe. Why: the reference sums every word's map before
    normalising by the frame's maximum, so a phrase with peaked attention (an object) sets the maximum and a
    phrase spread over a large region (a background) falls under the threshold; an edit that changes an object
    and the background then blends the background away (toy benchmark, issue 20: toy/RESULTS.md).
    """
    groups = phrases_of(token_indices)
    if token_weights is not None and len(groups) > 1:
        raise ValueError("token_weights apply to one phrase (a flat list of token indices), not to several")
    m = None
    for g in groups:
        part = soft_mask(word_map(maps, hw_list, g, token_weights), out_hw, pool=pool)
        m = part if m is None else torch.maximum(m, part)
    if threshold is None:
        return m
    return (m > float(threshold)).to(m.dtype)


def phrases_of(token_indices) -> list[list[int]]:
    """[i, j, ...] -> [[i, j, ...]] (one phrase); [[i, j], [k]] -> itself (several); raises on an empty list."""
    items = list(token_indices)
    if not items:
        raise ValueError("no token indices given for the mask")
    nested = [isinstance(x, (list, tuple)) for x in items]
    if all(nested):
        groups = [[int(i) for i in g] for g in items if len(g)]
        if not groups:
            raise ValueError("no token indices given for the mask")
        return groups
    if any(nested):
        raise ValueError("token indices must be all positions or all phrases (lists of positions), not a mix")
    return [[int(i) for i in items]]


def word_share_mask(maps: Sequence[torch.Tensor], hw_list: Sequence, token_indices: Sequence[int],
                    word_indices: Sequence[int], out_hw, share: float = 0.5) -> torch.Tensor:
    """[F, H, W] float 0/1: 1 where the words `token_indices` take more than `share` of the attention a query gives
    to the prompt's words `word_indices` (its context positions without BOS, end-of-text and padding).

    maps / hw_list as `cross_attention_mask` (layers averaged by `word_map` before the ratio); resized to `out_hw`
    (nearest). Where no word gets any attention the mask is 0. Why: `cross_attention_mask` normalises each frame
    by its maximum, so a word whose attention is weak everywhere but at a few peaks is found only at the peaks;
    a plain background word ("gray", "white") is such a word: most of the background attends to the padding, not
    to it, but of what it gives the prompt's words it gives the background word the most (toy benchmark, issue 20:
    InFusion's background changes, docs/infusion.md). Renormalising attention over the prompt's words, without
    the start token, is Attend-and-Excite's (Chefer et al. 2023) reading of a word's map."""
    if not 0.0 < float(share) < 1.0:
        raise ValueError(f"share must be in (0, 1), got {share}")
    words = [int(i) for i in word_indices]
    idx = [int(i) for i in token_indices]
    if not words or not set(idx) <= set(words):
        raise ValueError(f"the token indices {idx} must be among the prompt's word positions {words}")
    part = word_map(maps, hw_list, idx)
    whole = word_map(maps, hw_list, words)
    ratio = torch.where(whole > 0, part / whole.clamp_min(1e-30), torch.zeros_like(part))
    ratio = F.interpolate(ratio.unsqueeze(1), size=_as_hw(out_hw), mode="nearest")[:, 0]
    return (ratio > float(share)).to(ratio.dtype)


def union(*masks: torch.Tensor) -> torch.Tensor:
    """Pixel-wise union (max) of masks of the same shape."""
    out = masks[0]
    for m in masks[1:]:
        out = torch.maximum(out, m)
    return out


def dilate(mask: torch.Tensor, radius: int = 1) -> torch.Tensor:
    """Grow a [F, H, W] mask by `radius` pixels (square structuring element)."""
    if radius <= 0:
        return mask
    k = 2 * radius + 1
    return F.max_pool2d(mask.float().unsqueeze(1), kernel_size=k, stride=1, padding=radius)[:, 0].to(mask.dtype)


def temporal_smooth(mask: torch.Tensor, radius: int = 1, mode: str = "max") -> torch.Tensor:
    """Combine every frame's mask with its neighbours within `radius` frames ("max" = union, "mean")."""
    if radius <= 0 or mask.shape[0] <= 1:
        return mask
    x = mask.float().permute(1, 2, 0).unsqueeze(1)  # [H, 1, W, F]: pool along the frame axis
    k = 2 * radius + 1
    if mode == "max":
        y = F.max_pool2d(x, kernel_size=(1, k), stride=1, padding=(0, radius))
    elif mode == "mean":
        y = F.avg_pool2d(F.pad(x, (radius, radius, 0, 0), mode="replicate"), kernel_size=(1, k), stride=1)
    else:
        raise ValueError(f"temporal_smooth mode must be 'max' or 'mean', got {mode!r}")
    return y[:, 0].permute(2, 0, 1).to(mask.dtype)
