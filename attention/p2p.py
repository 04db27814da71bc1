"""Prompt-to-Prompt cross-attention control and FateZero self-attention fusion (formulas only).

Shapes: cross-attention maps are [..., Nq, T] (T = 77 text tokens), self-attention maps [..., Nq, Nk].
`base` is the source map (FateZero: the map stored at inversion for the same timestep), `edit` the
map the edit pass computed.

- word swap:   ctrl[..., j] = sum_i base[..., i] * M[i, j]                     (M from align.replacement_mapper)
- refinement:  ctrl[..., j] = base[..., mapper[j]] * a[j] + edit[..., j] * (1 - a[j])
- reweighting: ctrl[..., j] *= e[j]      (applied on top of swap/refine, no renormalisation, as P2P)
- time window: out = ctrl * alpha_t[j] + edit * (1 - alpha_t[j]), alpha_t[j] in {0, 1} per step and
  token (`time_word_alphas`, like P2P's get_time_words_attention_alpha): with N steps and window
  (s, e), the rows int(s*(N+1)) <= i < int(e*(N+1)) are 1 (step 0 = the noisiest step).
- end-of-text maps (`END_OF_TEXT_MAPS`, `own_end_of_text`): the edit prompt's end-of-text token and the padding
  after it keep the edit's own maps ("edit", the pack's default) or take the source's maps as P2P, FateZero and
  Video-P2P do ("source"). CLIP's text encoder is causal: those tokens have read the whole edit prompt, the
  changed words included, and in the source pass the whole source prompt; their source maps hold where the old
  prompt's content was read. Measured on the toy model (toy/RESULTS.md): with the source's maps FateZero keeps a
  plain gray or white background where black is asked for (0% of the frames; with the edit's own maps 100%); on
  the dev split the FateZero rows edit 7-10 points more with the edit's own, on the held-out test split -4 to +1
  (Video-P2P +3) at 1-1.7 dB less local background: a fix for one kind of edit, not a gain over all of them.
- self-attention in the window [int(N*s), int(N*e)): full replacement `base`, or FateZero's blend
  `M * edit + (1 - M) * base` with a per-query-pixel mask M (1 = the edited region keeps its own map).

This module does not import ComfyUI.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

MAX_LEN = 77
# Which maps the edit prompt's end-of-text token and padding take under cross-attention control (module docstring).
END_OF_TEXT_MAPS = ("edit", "source")


def own_end_of_text(alphas: torch.Tensor, end_of_text: int, maps: str) -> torch.Tensor:
    """The [..., T] control weights (`time_word_alphas` rows, or one row) with the columns from `end_of_text` (the
    edit prompt's end-of-text position, `align.end_of_text`) set to 0 when `maps` is "edit" (the edit keeps its
    own maps there); unchanged for "source". Raises ValueError for another `maps`."""
    if maps not in END_OF_TEXT_MAPS:
        raise ValueError(f"end-of-text maps must be one of {', '.join(END_OF_TEXT_MAPS)} (got {maps!r})")
    if maps == "source":
        return alphas
    out = alphas.clone()
    out[..., int(end_of_text):] = 0.0
    return out


def as_window(w) -> tuple[float, float]:
    """A window given as end fraction b (-> (0, b)) or as (start, end) fractions."""
    if isinstance(w, (int, float)):
        return 0.0, float(w)
    s, e = w
    return float(s), float(e)


def cross_window_rows(num_steps: int, window) -> tuple[int, int]:
    s, e = as_window(window)
    return int(s * (num_steps + 1)), int(e * (num_steps + 1))


def self_window_steps(num_steps: int, window) -> tuple[int, int]:
    s, e = as_window(window)
    return int(num_steps * s), int(num_steps * e)


def time_word_alphas(num_steps: int, window, word_windows: Sequence[tuple[Sequence[int], object]] = (),
                     max_len: int = MAX_LEN) -> torch.Tensor:
    """[num_steps + 1, max_len] 0/1 schedule: row i = edit step i (0 = noisiest), column = text token.

    `window` applies to every token; `word_windows` is [(token positions, window)] and overrides it for
    those tokens (a per-word cross-attention replace window)."""
    alphas = torch.zeros(num_steps + 1, max_len)
    a, b = cross_window_rows(num_steps, window)
    alphas[a:b] = 1.0
    for idx, w in word_windows:
        idx = [int(i) for i in idx]
        if not idx:
            continue
        a, b = cross_window_rows(num_steps, w)
        alphas[:, idx] = 0.0
        alphas[a:b, idx] = 1.0
    return alphas


def equalizer(indices_values: Sequence[tuple[Sequence[int], float]], max_len: int = MAX_LEN) -> torch.Tensor:
    """[max_len] token weights: 1 everywhere, `value` at the given positions."""
    e = torch.ones(max_len)
    for idx, value in indices_values:
        for i in idx:
            e[int(i)] = float(value)
    return e


def replace_cross(base: torch.Tensor, mapper: torch.Tensor) -> torch.Tensor:
    """Word swap: [..., Nq, T] @ [T, T]."""
    return base @ mapper.to(base.device, base.dtype)


def refine_cross(base: torch.Tensor, edit: torch.Tensor, mapper: torch.Tensor, alphas: torch.Tensor) -> torch.Tensor:
    """Refinement: take the aligned source columns, keep the edit's own columns for new tokens."""
    idx = mapper.to(base.device).clamp_min(0)
    a = alphas.to(base.device, base.dtype)
    return base.index_select(-1, idx) * a + edit * (1.0 - a)


def cross_control(base: torch.Tensor, edit: torch.Tensor, step_alpha: torch.Tensor, mode: str,
                  mapper: torch.Tensor | None = None, alphas: torch.Tensor | None = None,
                  eq: torch.Tensor | None = None) -> torch.Tensor:
    """One step of P2P cross-attention control: swap/refine/none, reweight, time-window blend.

    mode "replace" needs the [T, T] mapper, "refine" the (mapper, alphas) pair, "none" uses the
    source map as is (the same prompt: identity mapping)."""
    if mode == "replace":
        ctrl = replace_cross(base, mapper)
    elif mode == "refine":
        ctrl = refine_cross(base, edit, mapper, alphas)
    elif mode == "none":
        ctrl = base
    else:
        raise ValueError(f"unknown cross-attention control mode {mode!r}")
    if eq is not None:
        ctrl = ctrl * eq.to(ctrl.device, ctrl.dtype)
    a = step_alpha.to(edit.device, edit.dtype)
    return ctrl * a + edit * (1.0 - a)


def self_fusion(edit: torch.Tensor, base: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """FateZero self-attention fusion. edit/base [F, heads, Nq, Nk]; mask [F, Nq] (1 = keep the edit's
    own map) or None for full replacement by the inversion's map."""
    if mask is None:
        return base
    m = mask.to(edit.device, edit.dtype).reshape(mask.shape[0], 1, mask.shape[1], 1)
    return m * edit + (1.0 - m) * base


class CrossAttentionReweight:
    """Prompt-to-Prompt's reweighting without a source (P2P's `AttentionReweight` applied to the edit's own maps):
    an attention processor (attention/processor.py) that multiplies the cross-attention probabilities of chosen
    tokens of the edit prompt by their factor, on the conditional rows, in every cross-attention layer, during the
    first `end` of the sampling steps (edit step i < int(end * N), 0 = the noisiest), without renormalising.

    For edits whose method has no cross-attention control of its own there (InFusion before its fusion phase,
    Blended Latent Diffusion): on an inverted z_T that holds the old content a new word attends too weakly to
    override it, which is why FateZero's and Video-P2P's configs reweight the new words (their controllers apply
    the same factors inside `cross_control`). equalizer: [77] token factors (`equalizer`; the nodes build it with
    `fatezero.reweight_equalizer` from 'word:factor' text). The step comes from the sampler's `sample_sigmas`
    (AttnCall.step_index / total_steps); a call whose step is unknown is refused (ValueError), never passed
    through unweighted. Inside the Video-P2P Guider's two-branch batch (a chunk's rows are [source branch frames,
    target branch frames], `videop2p.BRANCHES_KEY`) only the target branch's rows are reweighted: the source branch
    runs the source prompt, whose tokens the factors do not name. Measured on the toy benchmark's dev split
    (issue 20, toy/RESULTS.md)."""

    def __init__(self, equalizer: torch.Tensor, end: float):
        if not (0.0 < float(end) <= 1.0):
            raise ValueError(f"end must be in (0, 1], got {end:g}")
        from .videop2p import BRANCHES_KEY  # (videop2p imports this module: resolved once, not per call)

        self.equalizer = equalizer.detach().float().cpu()
        self.end = float(end)
        self.calls = 0  # reweighted attention calls (over runs), for the tests and the UI
        self._branches_key = BRANCHES_KEY
        self._eq: dict = {}  # (tokens, device, dtype) -> [T] factors, built once per context length

    def __deepcopy__(self, memo):
        return self

    def last_step(self, total_steps: int) -> int:
        """The number of leading steps reweighted out of `total_steps`."""
        return int(self.end * total_steps)

    def active(self, call) -> bool:
        if call.kind != "cross" or 0 not in call.cond_or_uncond:
            return False
        if call.step_index is None or call.total_steps is None:
            raise ValueError(
                "Cross-Attention Reweight: the sampler's step is unknown in this attention call (no sample_sigmas "
                "in transformer_options, or a sigma not among them); sample with a ComfyUI sampler node "
                "(KSampler, KSamplerAdvanced, SamplerCustomAdvanced)")
        return call.step_index < self.last_step(call.total_steps)

    def kinds(self, call) -> set[int]:
        return {0}

    def __call__(self, call, probs: torch.Tensor) -> torch.Tensor:
        key = (probs.shape[-1], probs.device, probs.dtype)
        eq = self._eq.get(key)
        if eq is None:  # the factors for this context length (tokens past the 77 keep weight 1)
            eq = torch.ones(key[0], device=probs.device, dtype=probs.dtype)
            n = min(key[0], self.equalizer.shape[0])
            eq[:n] = self.equalizer[:n].to(probs.device, probs.dtype)
            self._eq[key] = eq
        first = call.frames // 2 if int((call.extra or {}).get(self._branches_key, 1)) == 2 else 0  # target only
        out = probs.clone()
        for j, c in enumerate(call.cond_or_uncond):
            if c == 0:
                sl = slice(j * call.frames + first, (j + 1) * call.frames)
                out[sl] = probs[sl] * eq
        self.calls += 1
        return out
