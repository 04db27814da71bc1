"""Attention with explicit probabilities, and the row layout of a ComfyUI attention call.

Rows of q/k/v inside a ComfyUI attention patch are `chunk * F + frame`: the latent batch (the F frames)
repeated once per conditioning chunk, chunk i being `cond_or_uncond[i]` (0 = cond, 1 = uncond).
"""

from __future__ import annotations

import torch


def attention_probs(q: torch.Tensor, k: torch.Tensor, heads: int) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) per head, in float32: [B, Nq, h*d], [B, Nk, h*d] -> [B, h, Nq, Nk]."""
    b, nq, inner = q.shape
    d = inner // heads
    qh = q.reshape(b, nq, heads, d).transpose(1, 2).float()
    kh = k.reshape(k.shape[0], k.shape[1], heads, d).transpose(1, 2).float()
    return (qh @ kh.transpose(-1, -2) * d**-0.5).softmax(-1)


def apply_probs(probs: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """probs [B, h, Nq, Nk] @ v [B, Nk, h*d] -> [B, Nq, h*d] (in v's dtype)."""
    b, nk, inner = v.shape
    d = inner // heads
    vh = v.reshape(b, nk, heads, d).transpose(1, 2)
    out = probs.to(vh.dtype) @ vh
    return out.transpose(1, 2).reshape(b, probs.shape[2], inner)


def rows_of_chunk(cond_or_uncond: list[int], frames: int, which: int) -> list[int]:
    """Row indices of the chunks equal to `which` (0 = cond, 1 = uncond)."""
    rows: list[int] = []
    for i, c in enumerate(cond_or_uncond):
        if c == which:
            rows.extend(range(i * frames, (i + 1) * frames))
    return rows


def chunk_rows(cond_or_uncond: list[int], frames: int) -> list[tuple[int, slice]]:
    """[(chunk kind, row slice)] for every chunk of a call."""
    return [(c, slice(i * frames, (i + 1) * frames)) for i, c in enumerate(cond_or_uncond)]
