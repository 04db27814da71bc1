"""Spatial-temporal self-attention without new weights: each frame's queries attend to the keys/values
of other frames (FateZero's SparseCausalAttention, Video-P2P's FrameAttention, Tune-A-Video's
sparse-causal attention).

Modes (which frames give keys/values to frame i of F):
- "per-frame":      i itself (plain spatial self-attention; the patch is a no-op)
- "first":          frame 0 (Video-P2P FrameAttention)
- "middle":         frame (F-1)//2 (FateZero's zero-shot configs, `SparseCausalAttention_index: ['mid']`)
- "previous+first": frame max(i-1, 0) and frame 0 (Tune-A-Video; FateZero's default `[-1, 'first']`)
- "all":            every frame (full cross-frame attention; memory grows with F^2)

`include_self` adds the frame's own keys/values (the references do not, except in "all"). Every frame
gets the same number of key frames (a frame that is its own key frame gets it twice, which leaves the
attention output unchanged, as in Tune-A-Video where frame 0's "previous" frame is frame 0).

With context windows, `frame_ids` are the absolute frame indices of the frames in the call; key frames
are chosen among them ("first" = the smallest index in the window, "previous" = the frame whose index is
one less if present, else the frame itself, "middle" = the clip's middle frame if the window holds it and
says how long the clip is, else the window's middle). Frames outside the call cannot be reached, which is
why Video Context Windows adds the clip's first and middle frames to every window by default.

This module does not import ComfyUI.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

MODES = ("per-frame", "first", "middle", "previous+first", "all")


def key_frames(mode: str, frames: int, include_self: bool = False,
               frame_ids: Sequence[int] | None = None, total_frames: int | None = None) -> list[list[int]]:
    """For every local frame, the local indices of its key/value frames (equal length for all frames).
    `total_frames` (the clip's length, with context windows): "middle" is the clip's middle frame
    (total_frames - 1) // 2 when the window holds it."""
    if mode not in MODES:
        raise ValueError(f"unknown temporal attention mode {mode!r}; choose one of {', '.join(MODES)}")
    ids = list(range(frames)) if frame_ids is None else [int(i) for i in frame_ids]
    if len(ids) != frames:
        raise ValueError(f"{len(ids)} frame indices for {frames} frames")
    order = sorted(range(frames), key=lambda i: ids[i])
    first = order[0]
    middle = order[(frames - 1) // 2]
    pos = {a: i for i, a in enumerate(ids)}
    if total_frames is not None and (int(total_frames) - 1) // 2 in pos:
        middle = pos[(int(total_frames) - 1) // 2]
    out: list[list[int]] = []
    for i in range(frames):
        if mode == "per-frame":
            out.append([i])
            continue
        if mode == "all":
            out.append(list(range(frames)))
            continue
        if mode == "first":
            ks = [first]
        elif mode == "middle":
            ks = [middle]
        else:  # previous+first
            ks = [pos.get(ids[i] - 1, i), first]
        if include_self:
            ks = ks + [i]
        out.append(ks)
    return out


def shares_keys(keys: list[list[int]]) -> bool:
    """True when every frame uses the same key frames (then the gathered keys are identical rows)."""
    return all(k == keys[0] for k in keys)


def gather_frames(h: torch.Tensor, chunks: int, keys: list[list[int]]) -> torch.Tensor:
    """[chunks*F, N, C] -> [chunks*F, K*N, C]: row chunk*F+i gets the concatenated tokens of its key frames
    (of the same chunk)."""
    bf, n, c = h.shape
    f = len(keys)
    if bf != chunks * f:
        raise ValueError(f"{bf} rows are not {chunks} chunk(s) x {f} frames")
    k = len(keys[0])
    idx = torch.tensor(keys, device=h.device)  # [F, K]
    hv = h.reshape(chunks, f, n, c)
    g = hv[:, idx.reshape(-1)]  # [chunks, F*K, N, C]
    return g.reshape(chunks * f, k * n, c)


class TemporalKV:
    """An attn1_patch: `patch(n, context, value, extra_options) -> (n, context, value)` that lengthens
    the keys/values of self-attention with other frames' hidden states. Layers with fewer than
    `min_channels` channels stay per-frame (FateZero's least_sc_channel)."""

    is_zsve_temporal = True

    def __init__(self, mode: str = "middle", include_self: bool = False, min_channels: int = 0):
        if mode not in MODES:
            raise ValueError(f"unknown temporal attention mode {mode!r}; choose one of {', '.join(MODES)}")
        self.mode = mode
        self.include_self = bool(include_self)
        self.min_channels = int(min_channels)

    def __deepcopy__(self, memo):
        return self

    def __repr__(self):
        return f"TemporalKV(mode={self.mode!r}, include_self={self.include_self}, min_channels={self.min_channels})"

    def applies(self, channels: int) -> bool:
        return self.mode != "per-frame" and channels >= self.min_channels

    def __call__(self, n, context, value, extra_options):
        if not self.applies(n.shape[-1]):
            return n, context, value
        chunks = max(1, len(extra_options.get("cond_or_uncond") or [0]))
        # Two-branch edits (Video-P2P) carry [branch][frame] rows per chunk: each branch is its own video.
        chunks *= max(1, int(extra_options.get("zsve_branches", 1)))
        frames = n.shape[0] // chunks
        if frames <= 1:
            # A single frame is its own key frame in every mode.
            return n, context, value
        window = extra_options.get("context_window")
        ids = list(window.index_list) if window is not None and hasattr(window, "index_list") else None
        total = getattr(window, "zsve_total_frames", None) if ids is not None else None
        keys = key_frames(self.mode, frames, self.include_self, ids, total)
        ctx = gather_frames(context, chunks, keys)
        val = ctx if value is context else gather_frames(value, chunks, keys)
        return n, ctx, val
