"""Attention with explicit probabilities, and the row layout of a ComfyUI attention call.

Rows of q/k/v inside a ComfyUI attention patch are `chunk * F + frame`: the latent batch (the F frames)
repeated once per conditioning chunk, chunk i being `cond_or_uncond[i]` (0 = cond, 1 = uncond).
"""

from __future__ import annotations

import torch


def _heads(x: torch.Tensor, heads: int, head_range: tuple[int, int] | None) -> torch.Tensor:
    """[B, N, h*d] -> [B, h', N, d] for the heads of `head_range` (all if None)."""
    b, n, inner = x.shape
    xh = x.reshape(b, n, heads, inner // heads)
    if head_range is not None:
        xh = xh[:, :, head_range[0]:head_range[1]]
    return xh.transpose(1, 2)


def attention_probs(q: torch.Tensor, k: torch.Tensor, heads: int, dtype: torch.dtype = torch.float32,
                    head_range: tuple[int, int] | None = None) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) per head: [B, Nq, h*d], [B, Nk, h*d] -> [B, h', Nq, Nk] in `dtype`.

    Computed in float32 and returned in `dtype` (float32 by default; the dispatcher passes the call's compute
    dtype and a `head_range` (h0, h1) so that the float32 temporaries cover one chunk of heads only)."""
    d = q.shape[-1] // heads
    qh = _heads(q, heads, head_range).float() * d**-0.5
    kh = _heads(k, heads, head_range).float()
    return (qh @ kh.transpose(-1, -2)).softmax(-1).to(dtype)


def apply_probs(probs: torch.Tensor, v: torch.Tensor, heads: int,
                head_range: tuple[int, int] | None = None) -> torch.Tensor:
    """probs [B, h', Nq, Nk] @ v [B, Nk, h*d] -> [B, Nq, h'*d] (in v's dtype), for the heads of `head_range`."""
    vh = _heads(v, heads, head_range)
    out = probs.to(vh.dtype) @ vh
    return out.transpose(1, 2).reshape(v.shape[0], probs.shape[2], vh.shape[1] * vh.shape[-1])


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
