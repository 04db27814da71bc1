"""Blended Latent Diffusion with the DDIM-inversion trajectory as background (BLD under attention control).

At every edit step inside the blend window the latent is

    z_t = M * z_t(edit) + (1 - M) * z_t(source)

where z_t(source) is the inversion trajectory's latent at the same sigma (attention/ddim.py, `Inversion`)
and M is a per-frame mask (from the edit-time cross-attention of chosen words, from a user mask, or both).

How it is done without owning the sampler
-----------------------------------------
The node installs a model patch, so any core sampler can drive the edit. A first-order step of
ComfyUI's `euler` / `ddim` samplers (DDIM eta=0 in VE sigma space) from x at sigma s to s' is

    x' = x + (x - D) * (s' - s) / s                                        (1)

with D the denoised prediction the model returns. (1) is affine in D, so the step that lands on a given
latent y is made by returning

    D_bg(x, y) = x - s * (y - x) / (s' - s)          (and D_bg = y when s' = 0)      (2)

Returning D_out = M * D + (1 - M) * D_bg(x, z_src(s')) therefore gives, by (1),

    x' = M * (x + (x - D) (s' - s) / s) + (1 - M) * z_src(s')
       = M * z_{s'}(edit step from x) + (1 - M) * z_{s'}(source),

i.e. exactly the BLD blend of the step's result, with no change to the sampler. When x already equals
z_src(s) outside the mask (every step after the first blended one), (2) is the same as
D_bg = z_src(s) - s * (z_src(s') - z_src(s)) / (s' - s); we use the sampler's own x, which is exact
also at the first blended step (where x is still the free edit when the window starts late).
The UNet's input is the sampler state, which after each blended step *is* the blended latent
(BLD's z_t); at the first blended step it is the unblended state, as in BLD. At the last step
(s' = 0) D_bg is the clean source latent.

Samplers that are not first order (heun, dpm++ 2m, ...) evaluate the model at other sigmas or combine
several D's; the blend is exact only for `euler` and `ddim` (the ones that invert DDIM).

The mask from cross-attention (computed online, during the very model call that the blend wraps):
the cross-attention probabilities of the conditional rows at the chosen layers (the 16x16-equivalent,
second-lowest resolution ones) are averaged over heads; the pack's mask recipe
(`attention/masks.py::cross_attention_mask`, FateZero's) sums them over the words' tokens, averages over
layers, max-pools 3x3, resizes to the latent and normalises per frame; then the soft map is optionally
averaged over neighbouring frames, thresholded and dilated.

This module does not import ComfyUI.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from . import masks
from .masks import cross_attention_mask

# Per-call transformer_options entry: {blend key: MapCollector} (placed by the blend's model wrapper for
# the duration of one model call, read by `BlendMapProcessor` inside the attention dispatcher).
COLLECTORS_KEY = "zsve_blend_collectors"

MASK_SOURCES = ("cross-attention", "user mask", "union")


# --- the blend ----------------------------------------------------------------------------------------


def blend(edit: torch.Tensor, source: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """M * edit + (1 - M) * source (written so that M = 1 gives `edit` and M = 0 gives `source` exactly)."""
    return mask * edit + (1.0 - mask) * source


def background_denoised(x: torch.Tensor, target_next: torch.Tensor, sigma: float, sigma_next: float) -> torch.Tensor:
    """The denoised prediction that makes an Euler/DDIM step from (x, sigma) land on `target_next` at
    sigma_next: equation (2) of the module docstring."""
    sigma, sigma_next = float(sigma), float(sigma_next)
    if sigma <= 0.0:
        raise ValueError("background_denoised: sigma must be > 0 (a step starts from a noisy latent)")
    if sigma_next == sigma:
        raise ValueError("background_denoised: sigma_next equals sigma (a zero-length step)")
    if sigma_next == 0.0:
        return target_next.expand_as(x).clone()
    return x - sigma * (target_next - x) / (sigma_next - sigma)


def blended_denoised(denoised: torch.Tensor, x: torch.Tensor, source_next: torch.Tensor, mask: torch.Tensor,
                     sigma: float, sigma_next: float) -> torch.Tensor:
    """D_out = M * D + (1 - M) * D_bg: after an Euler/DDIM step the state is M * edit + (1 - M) * source."""
    return blend(denoised, background_denoised(x, source_next, sigma, sigma_next), mask)


def euler_step(x: torch.Tensor, denoised: torch.Tensor, sigma: float, sigma_next: float) -> torch.Tensor:
    """ComfyUI's `euler` step (= DDIM eta 0 in VE space), for tests and documentation."""
    return x + (x - denoised) / float(sigma) * (float(sigma_next) - float(sigma))


def fresh_noise_start(x: torch.Tensor, source_x0: torch.Tensor, mask: torch.Tensor, sigma: float,
                      seed: int) -> torch.Tensor:
    """Blended Latent Diffusion's start inside `mask`: M * (x0 + sigma * eps) + (1 - M) * x.

    x [F, C, h, w]: the sampler's first latent (the inverted z_T at sigma, the model's internal space);
    source_x0 [F, C, h, w]: the source latent (the inversion's sigma-0 latent); mask [F, 1, h, w] 0/1.
    eps [1, C, h, w] ~ N(0, I) from a CPU generator seeded with `seed` (reduced mod 2**64), one map for all frames:
    per-frame noise nearly doubled the toy benchmark's warp error (toy/RESULTS.md, "Colour swaps against a
    faithful z_T"). x0 + sigma * eps is the noising of ComfyUI's sampling space at sigma (k-diffusion's; Blended
    Latent Diffusion starts from noise at the first step). Why: a faithful inversion's z_T holds the old object
    (its colour) so firmly that the edit prompt cannot repaint it; fresh noise inside the old object's mask lets it.
    """
    g = torch.Generator(device="cpu").manual_seed(int(seed) % (1 << 64))
    eps = torch.randn((1,) + tuple(x.shape[1:]), generator=g, dtype=torch.float32).to(x.device, x.dtype)
    return mask * (source_x0 + float(sigma) * eps) + (1.0 - mask) * x


def in_window(step: int, total_steps: int, start: float, end: float) -> bool:
    """Whether edit step `step` (0 = the first, noisiest step of a `total_steps` schedule) lies in the
    window [start, end) given as fractions of the steps."""
    first = math.ceil(start * total_steps - 1e-9)
    last = math.ceil(end * total_steps - 1e-9)
    return first <= step < last


# --- word tokens -------------------------------------------------------------------------------------


def parse_words(words: str) -> list[str]:
    """'cat, red hat' -> ['cat', 'red hat'] (comma-separated; a phrase may span several tokens)."""
    return [w.strip() for w in (words or "").split(",") if w.strip()]


# --- masks --------------------------------------------------------------------------------------------


def resize_maps(maps: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """[F, H, W] -> [F, h, w]: area averaging when shrinking, bilinear when enlarging."""
    if tuple(maps.shape[-2:]) == (h, w):
        return maps
    x = maps.unsqueeze(1).float()
    if maps.shape[-2] >= h and maps.shape[-1] >= w:
        x = F.interpolate(x, size=(h, w), mode="area")
    else:
        x = F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False)
    return x[:, 0]


def attention_blend_mask(maps: Sequence[torch.Tensor], hw_list: Sequence, out_hw: tuple[int, int], threshold: float,
                         dilation: int = 1, temporal_radius: int = 0,
                         phrases: Sequence[Sequence[int]] | None = None) -> torch.Tensor:
    """The blend mask from one step's word maps, with the pack's mask recipe (attention/masks.py, FateZero's):
    `maps[i]` [F, Nq_i, P] = layer i's head-averaged cross-attention of the words' P tokens. Sum over the
    tokens, mean over layers, 3x3 max-pool, resize, normalise per frame; then average the soft map over
    +-temporal_radius neighbouring frames, threshold (> threshold) and dilate with an odd square kernel.
    `phrases`: the columns (0..P-1) of each comma-separated phrase; each phrase is normalised on its own and the
    soft maps are united (masks.cross_attention_mask); None: one phrase of all P columns.
    -> [F, H, W] float 0/1."""
    if dilation < 1 or dilation % 2 == 0:
        raise ValueError(f"dilation kernel must be odd (1 = none), got {dilation}")
    positions = [list(g) for g in phrases] if phrases else list(range(maps[0].shape[-1]))
    soft = cross_attention_mask(maps, hw_list, positions, out_hw, threshold=None)
    soft = masks.temporal_smooth(soft, int(temporal_radius), mode="mean")
    return masks.dilate((soft > float(threshold)).float(), (int(dilation) - 1) // 2)


def prepare_user_mask(mask: torch.Tensor, frames: int, h: int, w: int) -> torch.Tensor:
    """A ComfyUI MASK ([H, W] or [B, H, W], pixel or latent size, values 0..1) -> [frames, h, w] float.

    B must be 1 (broadcast to every frame) or equal to `frames`; the mask's aspect ratio must be the
    latent's (it is resized to the latent size). Raises ValueError saying what to change."""
    if mask.ndim == 2:
        mask = mask.unsqueeze(0)
    if mask.ndim == 4 and mask.shape[1] == 1:
        mask = mask[:, 0]
    if mask.ndim != 3:
        raise ValueError(f"the mask must be a MASK batch [frames, height, width], got shape {list(mask.shape)}")
    b, mh, mw = mask.shape
    if b not in (1, frames):
        raise ValueError(
            f"the mask has {b} frames but the video has {frames}: give one mask per frame ({frames}) or a "
            "single mask for all frames"
        )
    sh, sw = mh / h, mw / w
    if abs(sh - sw) > 0.05 * max(sh, sw):
        raise ValueError(
            f"the mask is {mw}x{mh} (WxH) but the video latent is {w}x{h} (frames of about {w * 8}x{h * 8} pixels): "
            "the mask must have the frames' aspect ratio; make it from the same frames (same size) as the video"
        )
    m = resize_maps(mask.float().clamp(0.0, 1.0), h, w).clamp(0.0, 1.0)
    if b == 1 and frames > 1:
        m = m.expand(frames, h, w)
    return m.contiguous()


# --- collecting cross-attention maps during a model call -----------------------------------------------


class MapCollector:
    """Accumulates the word maps of one model call: for each matching attention call, the conditional
    rows' probabilities of the chosen token positions, averaged over heads (and over cond chunks), per
    layer and frame (frames of context windows are placed by their absolute index)."""

    def __init__(self, positions: Sequence[int], frames: int):
        self.positions = list(positions)
        self.frames = int(frames)
        self.layers: dict[str, list] = {}  # layer -> [sum [F, Nq, P], count [F], (h, w)]

    def add(self, call, probs: torch.Tensor) -> None:
        rows = call.rows(0)
        if not rows:
            return
        n_tokens = probs.shape[-1]
        if max(self.positions) >= n_tokens:
            raise ValueError(
                f"the chosen words sit at token positions {self.positions} but the positive conditioning has only "
                f"{n_tokens} tokens: the 'prompt' text must be the text encoded into the sampler's positive "
                "CONDITIONING"
            )
        p = probs[rows][..., self.positions].mean(1)  # [chunks * F, Nq, P]
        p = p.reshape(-1, call.frames, p.shape[-2], p.shape[-1]).mean(0)  # [F_call, Nq, P]
        entry = self.layers.get(call.layer)
        if entry is None:
            entry = [p.new_zeros(self.frames, p.shape[-2], p.shape[-1]), p.new_zeros(self.frames), call.hw]
            self.layers[call.layer] = entry
        idx = list(range(call.frames)) if call.frame_index is None else list(call.frame_index)
        entry[0][idx] += p.detach().float()
        entry[1][idx] += 1

    def maps(self) -> tuple[list[torch.Tensor], list[tuple[int, int]]]:
        """Per layer [F, Nq, P] (mean over the calls that saw each frame) and the layers' (h, w)."""
        out, hws = [], []
        for total, count, hw in self.layers.values():
            out.append(total / count.clamp_min(1).view(-1, 1, 1))
            hws.append(hw)
        return out, hws


class BlendMapProcessor:
    """An attention processor (attention/processor.py) that reads cross-attention probabilities for the
    blend: active only for cross-attention at `layers` and only while the blend's wrapper has put a
    collector for `key` into the call's transformer options, and not in another node's guidance pass (PAG's
    perturbed pass would otherwise add its maps to the step's mask). It never changes the attention."""

    def __init__(self, key: str, layers: Sequence[str]):
        self.key = key
        self.layers = frozenset(layers)

    def __deepcopy__(self, memo):
        return self

    def _collector(self, call):
        return call.extra.get(COLLECTORS_KEY, {}).get(self.key)

    def kinds(self, call) -> set[int]:
        return {0}

    def active(self, call) -> bool:
        return call.kind == "cross" and call.layer in self.layers and 0 in call.cond_or_uncond \
            and not call.guidance and self._collector(call) is not None

    def __call__(self, call, probs: torch.Tensor) -> None:
        self._collector(call).add(call, probs)
        return None


def second_lowest_resolution_layers(layer_downsample: dict[str, int]) -> list[str]:
    """Layers at the second-largest downsampling factor among those with cross-attention (16x16 for
    SD1.5 at 512x512: input 7, 8 and output 3, 4, 5, as in FateZero's blend); the only one if there is
    just one."""
    factors = sorted(set(layer_downsample.values()), reverse=True)
    if not factors:
        return []
    target = factors[1] if len(factors) > 1 else factors[0]
    return [name for name, ds in layer_downsample.items() if ds == target]
