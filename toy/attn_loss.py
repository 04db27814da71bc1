"""An optional training aid for the toy model: a token-localisation loss on its cross-attention (in the
spirit of TokenCompose, Wang et al. 2024), so that the toy UNet attends with each object's words to that
object and with the background words to the background, as Stable Diffusion's cross-attention does.

Without it the tiny UNet reads the caption through globally mixed cross-attention (maps nearly flat, about
1/77 per token) and draws colour and shape with its convolutions; every method of the pack that derives a
mask from cross-attention (FateZero's blend, Video-P2P's Local Blend, InFusion's masks, attention-masked
Blended Latent Diffusion) then gets a mask covering the whole frame, which says nothing about the methods.

    loss = mean over layers, heads and chosen tokens of  1 - sum_{p in R_t} A[p, t] / sum_p A[p, t]

with R_t the token's region (soft, the fraction of each attention cell inside the ground-truth mask).
Chosen tokens: each object's colour and shape words -> the object's visible mask; the background's words
(without "a") -> everything outside the objects. Captions are the scenes' own ("a red circle and a green
square on yellow dots"): words 4k+1, 4k+2 name object k, the words after "on" the background.

Used by toy/train.py through a ComfyUI attn2 replace patch on the raw UNet call (no ComfyUI import here).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def token_regions(caption: str, n_objects: int, spans) -> list[tuple[list[int], int]]:
    """[(token positions, region id)] for a scene caption; region id k < n_objects is object k, -1 the
    background. `spans` = align.word_spans(caption, tokenizer): [(word, [positions])]."""
    words = [w for w, _ in spans]
    out = []
    for k in range(n_objects):
        for wi in (4 * k + 1, 4 * k + 2):
            if wi < len(spans):
                out.append((list(spans[wi][1]), k))
    for wi in range(4 * n_objects, len(words)):
        if words[wi].lower() != "a":
            out.append((list(spans[wi][1]), -1))
    return out


def token_targets(batch_regions, batch_masks, size: int, tokens: int = 77):
    """Per-token region maps [B, T, size, size] (float, 0 where a token is not chosen) and the chosen-token
    indicator [B, T], from each sample's token_regions and its object masks (bool [size, size] each)."""
    b = len(batch_regions)
    maps = torch.zeros(b, tokens, size, size)
    used = torch.zeros(b, tokens)
    for i, (regions, masks) in enumerate(zip(batch_regions, batch_masks)):
        if not regions:
            continue
        objs = [torch.from_numpy(m).float() for m in masks]
        bg = 1.0 - torch.stack(objs).amax(0) if objs else torch.ones(size, size)
        for positions, rid in regions:
            region = bg if rid < 0 else objs[rid]
            for p in positions:
                if p < tokens:
                    maps[i, p] = region
                    used[i, p] = 1.0
    return maps, used


def localisation_loss(probs: torch.Tensor, maps: torch.Tensor, used: torch.Tensor,
                      weight: torch.Tensor | None = None) -> torch.Tensor:
    """probs [B, heads, N, T] of one cross-attention layer (square query map), maps/used from token_targets.
    `weight` [B] (optional) scales each sample's tokens (e.g. up on two-object scenes, whose words the committed
    model localises ~6x worse than one object's); the mean stays over the chosen tokens' count, so weight 1
    everywhere is the plain loss."""
    b, _, n, t = probs.shape
    side = int(round(math.sqrt(n)))
    region = F.adaptive_avg_pool2d(maps[:, :t], side).reshape(b, t, n).to(probs)  # [B, T, N]
    p = probs.mean(1)  # [B, N, T]
    inside = torch.einsum("bnt,btn->bt", p, region)
    total = p.sum(1).clamp_min(1e-8)
    u = used[:, :t].to(probs)
    w = u if weight is None else u * weight.to(probs)[:, None]
    return ((1.0 - inside / total) * w).sum() / u.sum().clamp_min(1.0)
