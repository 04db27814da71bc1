"""FateZero's edit-time attention fusion as a processor for the attention dispatcher.

At every UNet evaluation of the edit, the controller finds the inversion step with the same integer
timestep (see ddim.py: the edit step that starts at sigma_k evaluates the UNet where the inversion step
k-1 -> k did), and for the conditional rows (or all rows) of the call:

- cross-attention (inside the per-token time window): P2P word swap / refinement / reweighting of the
  *stored inversion* cross-attention (the source prompt's maps), blended with the edit's own map by
  the 0/1 time-word alphas (p2p.cross_control);
- self-attention (inside the self window [start, end)): the stored inversion map replaces the edit's
  (full replacement) or, with blend words, `M * edit + (1 - M) * inversion` with M the blend mask from
  the stored source cross-attention of the blend words at the same step (masks.cross_attention_mask).

Difference from FateZero's code (documented): steps are matched by timestep, not by counting calls,
so cond/uncond split into separate calls, extra model evaluations or context windows cannot shift the
steps. Where FateZero uses the 16x16 layers for the mask (SD1.5, 512x512: factor 4 below the latent),
a model without that level uses the recorded level closest to it.

This module does not import ComfyUI.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from . import align, p2p
from .masks import cross_attention_mask
from .store import AttentionStore, StoreLookupError, kept_steps


class FusionConfigError(ValueError):
    """A bad edit configuration; the message says what to change."""


@dataclass(eq=False)
class FusionPlan:
    num_steps: int
    timestep_to_step: dict  # model timestep -> edit step index (0 = noisiest)
    cross_mode: str = "none"  # replace | refine | none (same prompt) | off
    cross_alphas: torch.Tensor | None = None  # [N+1, 77]
    mapper: torch.Tensor | None = None  # [77, 77] (replace) or [77] int64 (refine)
    refine_alphas: torch.Tensor | None = None  # [77]
    equalizer: torch.Tensor | None = None  # [77]
    self_steps: tuple[int, int] = (0, 0)
    blend_indices: list[int] | None = None  # source token positions of the blend words
    blend_phrases: list[list[int]] | None = None  # the same per comma-separated phrase (one mask each, united)
    blend_threshold: float = 0.3
    mask_factor: int = 4
    only_cond: bool = True
    notes: list[str] = field(default_factory=list)

    def __deepcopy__(self, memo):
        return self


def parse_word_values(text: str, what: str) -> list[tuple[str, str]]:
    """"word:value, other word:value" -> [(word, value)]; commas or semicolons separate entries."""
    out = []
    for part in re.split(r"[,;\n]", text or ""):
        part = part.strip()
        if not part:
            continue
        if ":" not in part:
            raise FusionConfigError(f"{what}: '{part}' is not 'word:value' (e.g. 'watercolor:10')")
        word, value = part.rsplit(":", 1)
        out.append((word.strip(), value.strip()))
    return out


def parse_window(value: str, what: str) -> tuple[float, float]:
    """'0.5' -> (0, 0.5); '0.2-0.6' -> (0.2, 0.6)."""
    try:
        if "-" in value:
            a, b = value.split("-", 1)
            w = (float(a), float(b))
        else:
            w = (0.0, float(value))
    except ValueError:
        raise FusionConfigError(f"{what}: '{value}' is not a fraction like 0.5 or a range like 0.2-0.6") from None
    if not (0.0 <= w[0] <= w[1] <= 1.0):
        raise FusionConfigError(f"{what}: window {value} must satisfy 0 <= start <= end <= 1")
    return w


def reweight_equalizer(edit: str, reweight: str, tokenizer) -> torch.Tensor | None:
    """Prompt-to-Prompt's reweighting input 'word:factor, ...' (words of the edit prompt) as the equalizer [77]
    that multiplies those tokens' cross-attention (`p2p.equalizer`; P2P's AttentionReweight, FateZero's eq_params,
    Video-P2P's equalizer_params); None when empty. One parser for every node that reweights (Attention Blend,
    the Video-P2P guider, InFusion Inject). Raises FusionConfigError naming the entry that is not 'word:number'
    or a word the edit prompt does not have."""
    items = []
    for word, value in parse_word_values(reweight, "reweight"):
        idx = _word_positions(edit, word, tokenizer, "edit", "reweight")
        try:
            items.append((idx, float(value)))
        except ValueError:
            raise FusionConfigError(f"reweight: '{value}' is not a number (e.g. 'watercolor:10')") from None
    return p2p.equalizer(items) if items else None


def _word_positions(text: str, word: str, tokenizer, which: str, name: str) -> list[int]:
    try:
        found = align.phrase_positions(text, [word], tokenizer, which)
    except align.WordNotInPrompt as e:
        raise FusionConfigError(f"{name}: {e}") from None
    if not found:
        raise FusionConfigError(f"{name}: '{word}' names no word: give a word of the {which} prompt {text!r} before "
                                "the ':' (e.g. 'watercolor:10')")
    return found[0]


def make_plan(tokenizer, source: str, edit: str, inversion_timesteps: Sequence[int], mode: str = "refine",
              cross_window=0.8, word_windows: str = "", self_window=(0.0, 0.8), reweight: str = "",
              blend_words: str = "", blend_threshold: float = 0.3, only_cond: bool = True,
              record_window: float | None = None, mask_factor: int = 4,
              end_of_text_maps: str = "edit") -> FusionPlan:
    """Translate the edit settings into a FusionPlan (token alignment, schedules, checks).
    end_of_text_maps: "edit" (the edit prompt's end-of-text token and padding keep their own maps; the pack's
    default) or "source" (they take the source's maps, as P2P and FateZero): `attention/p2p.py`.
    Raises FusionConfigError naming the setting to change."""
    ts = list(inversion_timesteps)
    n = len(ts) - 1
    if n < 1:
        raise FusionConfigError("the inversion has no steps")
    notes: list[str] = []
    source, edit = source.strip(), edit.strip()
    if not source or not edit:
        raise FusionConfigError("give both the source prompt (the text the video was inverted with) and the edit prompt")
    same = source == edit
    if mode not in ("replace", "refine"):
        raise FusionConfigError(f"mode must be 'replace' or 'refine', got {mode!r}")
    if end_of_text_maps not in p2p.END_OF_TEXT_MAPS:
        raise FusionConfigError(f"end_of_text_maps must be one of {', '.join(p2p.END_OF_TEXT_MAPS)}, got "
                                f"{end_of_text_maps!r}")
    mapper = refine_alphas = None
    try:
        if same:
            cross_mode = "none"
        elif mode == "replace" and align.word_count(source) == align.word_count(edit):
            cross_mode = "replace"
            mapper = align.replacement_mapper(source, edit, tokenizer)
        else:
            if mode == "replace":
                notes.append(
                    f"word swap needs the same number of words ({align.word_count(source)} vs {align.word_count(edit)}); "
                    "using refinement (token alignment) instead, as FateZero does"
                )
            cross_mode = "refine"
            mapper, refine_alphas = align.refinement_mapper(source, edit, tokenizer)
        # per-word windows and reweighting refer to words of the edit prompt
        ww = []
        for word, value in parse_word_values(word_windows, "cross_replace_words"):
            idx = _word_positions(edit, word, tokenizer, "edit", "cross_replace_words")
            ww.append((idx, parse_window(value, f"cross_replace_words '{word}'")))
        eq = reweight_equalizer(edit, reweight, tokenizer)
        try:  # one list of source positions per comma-separated phrase (one mask each, united)
            phrases = align.phrase_positions(source, blend_words, tokenizer, "source")
        except align.WordNotInPrompt as e:
            raise FusionConfigError(f"blend_words: {e}; blend words name the object in the source video") from None
        blend = [p for phrase in phrases for p in phrase] or None
    except align.AlignmentError as e:
        raise FusionConfigError(str(e)) from None
    cw = p2p.as_window(cross_window)
    sw = p2p.as_window(self_window)
    for name, w in (("cross_replace", cw), ("self_replace", sw)):
        if not (0.0 <= w[0] <= w[1] <= 1.0):
            raise FusionConfigError(f"{name} window {w} must satisfy 0 <= start <= end <= 1")
    alphas = p2p.time_word_alphas(n, cw, ww)
    if cross_mode in ("replace", "refine"):
        alphas = p2p.own_end_of_text(alphas, align.end_of_text(edit, tokenizer), end_of_text_maps)
    self_steps = p2p.self_window_steps(n, sw)
    if record_window is not None:
        kept = kept_steps(n, record_window)
        need_cross = int(alphas[:n].any(1).nonzero().max()) + 1 if alphas[:n].any() else 0
        need = max(need_cross, self_steps[1] if self_steps[1] > self_steps[0] else 0)
        if need > kept:
            raise FusionConfigError(
                f"the replace windows reach edit step {need} of {n}, but the store recorded only the first {kept} "
                f"(AttentionStore record_window {record_window:g}); raise record_window to at least "
                f"{math.ceil(need / (n + 1) * 1000) / 1000:g} and re-run the inversion, or shorten the windows"
            )
    step_of = {int(ts[k]): n - k for k in range(1, n + 1)}
    return FusionPlan(
        num_steps=n, timestep_to_step=step_of, cross_mode=cross_mode, cross_alphas=alphas, mapper=mapper,
        refine_alphas=refine_alphas, equalizer=eq,
        self_steps=self_steps, blend_indices=blend, blend_phrases=phrases if phrases and len(phrases) > 1 else None,
        blend_threshold=float(blend_threshold),
        mask_factor=int(mask_factor), only_cond=bool(only_cond), notes=notes,
    )


def mask_layers(store: AttentionStore, factor: int) -> list[str]:
    """Recorded cross layers at `factor` below the latent, or at the recorded factor closest to it."""
    names = store.layer_names("cross")
    if not names:
        return []
    factors = sorted({store.layers[n].factor for n in names})
    best = min(factors, key=lambda f: (abs(math.log(f / factor)), -f))
    return [n for n in names if store.layers[n].factor == best]


def blend_mask(store: AttentionStore, plan: FusionPlan, timestep: int, out_hw, layers: list[str] | None = None,
               threshold: float | None | str = "plan") -> torch.Tensor:
    """[F, H, W] blend mask from the stored source cross-attention of the blend words at `timestep`
    (threshold "plan": the plan's threshold; None: the soft, normalised map)."""
    layers = mask_layers(store, plan.mask_factor) if layers is None else layers
    maps = [store.cross_mean(timestep, lay) for lay in layers]
    hws = [store.layers[lay].hw for lay in layers]
    th = plan.blend_threshold if threshold == "plan" else threshold
    return cross_attention_mask(maps, hws, plan.blend_phrases or plan.blend_indices, out_hw, threshold=th)


def preview_mask(store: AttentionStore, plan: FusionPlan, out_hw) -> torch.Tensor:
    """Per-frame preview [F, H, W]: the fraction of the self-fusion steps in which a pixel keeps its
    own (edited) self-attention. All ones without blend words (a global edit: everything may change)."""
    if not plan.blend_indices:
        return torch.ones(store.frames, *out_hw)
    a, b = plan.self_steps
    steps = [t for t, i in plan.timestep_to_step.items() if a <= i < b and store.has_step(t)]
    if not steps:
        steps = [t for t in store.timesteps]
    layers = mask_layers(store, plan.mask_factor)
    acc = torch.zeros(store.frames, *out_hw)
    for t in steps:
        acc += blend_mask(store, plan, t, out_hw, layers)
    return acc / max(1, len(steps))


def _split_rows(attend, keep: torch.Tensor, q, k, qs, ks, v) -> torch.Tensor:
    """Rows of a 0/1 fusion mask, each with its own map: per frame r, the query rows with keep[r] attend with the
    edit's (q, k), the others with the source's (qs, ks), both over v: [R, Nq, C], one optimized call per frame and
    side (about the cost of one call over all rows)."""
    out = None
    for r in range(q.shape[0]):
        for sel, qq, kk in ((keep[r], q, k), (~keep[r], qs, ks)):
            if not bool(sel.any()):
                continue
            o = attend(qq[r:r + 1, sel], kk[r:r + 1], v[r:r + 1])
            if out is None:
                out = o.new_empty((q.shape[0], q.shape[1], o.shape[-1]))
            out[r, sel] = o[0]
    return out


# transformer_options key under which the edit's source pass (nodes/_source_pass.py, recompute mode) hands each
# controller the source attention of the step being evaluated: {controller: AttentionStore holding that one step}
LIVE_STORE_KEY = "zsve_fatezero_source_step"


class FateZeroController:
    """Processor (attention/processor.py protocol) for the edit sampling. Immutable after construction;
    its caches depend only on the store and the plan, so sharing it between runs is safe.

    `store`: the inversion's AttentionStore, or None in recompute mode (`StoreConfig.recompute`): then every
    call reads the store of its own step from `call.extra[LIVE_STORE_KEY]`, which the source pass fills by
    evaluating the inversion's step again (one step at a time; nothing kept across steps)."""

    SELF_ATTENTION_CONTROL = True  # attention/processor.py check_company

    def __init__(self, store: AttentionStore | None, plan: FusionPlan):
        self.store = store
        self.plan = plan
        self._layers: dict = {}  # id(store) -> (self layers, cross layers, mask layers, mask cache)
        if store is not None:
            self._layer_sets(store)

    def __deepcopy__(self, memo):
        return self

    def _store(self, call) -> AttentionStore:
        if self.store is not None:
            return self.store
        st = (call.extra.get(LIVE_STORE_KEY) or {}).get(self) if call.extra else None
        if st is None:
            raise StoreLookupError(
                f"AttentionBlend: edit step at timestep {call.timestep} needs the source attention, but no source "
                "pass ran for it (recompute mode evaluates the inversion's step inside the sampler's model call). "
                "Sample the edit with KSamplerAdvanced / SamplerCustomAdvanced on this model."
            )
        return st

    def _layer_sets(self, st: AttentionStore):
        got = self._layers.get(id(st))
        if got is None or got[0] is not st:
            got = (st, set(st.layer_names("self")), set(st.layer_names("cross")),
                   mask_layers(st, self.plan.mask_factor) if self.plan.blend_indices else [], {})
            if self.store is None:
                self._layers.clear()  # recompute mode: one step's store at a time
            self._layers[id(st)] = got
        return got

    def fuses_at(self, i: int) -> bool:
        """Whether edit step i (0 = noisiest) reads the source attention (cross window or self window)."""
        p = self.plan
        cross = p.cross_mode != "off" and bool(p.cross_alphas[i].any())
        a, b = p.self_steps
        return cross or a <= i < b

    def _step(self, call) -> int:
        i = self.plan.timestep_to_step.get(call.timestep)
        if i is None:
            n = self.plan.num_steps
            raise StoreLookupError(
                f"AttentionBlend: the edit sampler evaluated the model at sigma {call.sigma:.4f} (timestep "
                f"{call.timestep}), which is not a step of the inversion ({n} DDIM steps). Sample the edit with the "
                f"same number of steps ({n}) and the ddim_uniform scheduler (sampler ddim or euler, add_noise "
                "disabled, from the inversion's z_T)."
            )
        return i

    def _frames(self, call) -> list[int] | None:
        st = self._store(call)
        if call.frame_index is not None:
            if max(call.frame_index) >= st.frames:
                raise ValueError(f"AttentionBlend: frame {max(call.frame_index)} requested, the inversion has "
                                 f"{st.frames} frame(s)")
            return list(call.frame_index)
        if call.frames != st.frames:
            raise ValueError(
                f"AttentionBlend: the edit samples {call.frames} frame(s) but the inversion recorded {st.frames}. "
                "Edit the same frames you inverted (use the inversion's z_T as the sampler's latent)."
            )
        return None

    def active(self, call) -> bool:
        i = self._step(call)
        if self.plan.only_cond and 0 not in call.cond_or_uncond:
            return False
        if self.store is None and not self.fuses_at(i):
            return False
        st = self._store(call)
        self._frames(call)
        _, self_layers, cross_layers, _, _ = self._layer_sets(st)
        if call.kind == "cross":
            if self.plan.cross_mode == "off" or call.layer not in cross_layers:
                return False
            on = bool(self.plan.cross_alphas[i].any())
        else:
            a, b = self.plan.self_steps
            on = a <= i < b and call.layer in self_layers
        if on and not st.has_step(call.timestep):
            raise StoreLookupError(
                f"AttentionBlend: edit step {i} (timestep {call.timestep}) is inside a replace window but the store "
                "has no attention for it. Raise AttentionStore's record_window to cover the windows and re-run the "
                "inversion."
            )
        return on

    # dispatcher protocol extensions (attention/processor.py) --------------------------------------------
    def kinds(self, call) -> set[int]:
        return {0} if self.plan.only_cond else {0, 1}

    def splits_heads(self, call) -> bool:
        return call.kind == "self"

    def attend_output(self, call, attend) -> torch.Tensor | None:
        """Self-attention fusion at the level of the output, with optimized attention only: the fused map
        m * P_edit + (1 - m) * P_src (m per query row) gives m * attend(q, k, v) + (1 - m) * attend(q_src,
        k_src, v); full replacement (no blend words) is attend(q_src, k_src, v) alone. Exact: the same
        probs @ v as __call__ without forming the [F, heads, Nq, Nk] maps."""
        if call.kind != "self":
            return None
        self._step(call)
        frames = self._frames(call)
        t = call.timestep
        q, k, v = call.q, call.k, call.v
        f = call.frames
        fused = [j for j, c in enumerate(call.cond_or_uncond) if c == 0 or not self.plan.only_cond]
        if not fused:
            return None
        qs, ks = self._store(call).self_qk(t, call.layer, frames, device=q.device, window=frames)
        if ks.shape[1] != k.shape[1] or qs.shape[1:] != q.shape[1:]:
            raise ValueError(
                f"AttentionBlend: self-attention of layer {call.layer} has {k.shape[1]} keys at the edit but "
                f"{ks.shape[1]} at the inversion. Apply the same TemporalSelfAttentionPatch (same mode) to the "
                "model used for VideoDDIMInvert and to the model used for the edit sampling."
            )
        idx = torch.cat([torch.arange(j * f, (j + 1) * f) for j in fused]).to(q.device)
        n = len(fused)
        qs, ks = qs.to(q.dtype).repeat(n, 1, 1), ks.to(k.dtype).repeat(n, 1, 1)
        mask = None
        if self.plan.blend_indices:
            mask = self._mask(call, t, call.hw)
            if frames is not None:
                mask = mask[torch.as_tensor(frames)]
            mask = mask.to(q.device).repeat(n, 1)  # [n*F, Nq]
        if mask is None:
            base = attend(qs, ks, v[idx])
        elif bool(((mask == 0) | (mask == 1)).all()):  # the thresholded blend mask: each row takes one map
            base = _split_rows(attend, mask > 0.5, q[idx], k[idx], qs, ks, v[idx])
        else:
            m = mask.to(v.dtype).unsqueeze(-1)
            base = m * attend(q[idx], k[idx], v[idx]) + (1.0 - m) * attend(qs, ks, v[idx])
        if n == len(call.cond_or_uncond):
            return base
        out = attend(q, k, v)
        out[idx] = base.to(out.dtype)
        return out

    def _mask(self, call, timestep: int, hw) -> torch.Tensor:
        st = self._store(call)
        _, _, _, layers, cache = self._layer_sets(st)
        key = (timestep, tuple(hw))
        m = cache.get(key)
        if m is None:
            m = blend_mask(st, self.plan, timestep, hw, layers)
            m = m.reshape(m.shape[0], -1)
            cache[key] = m
        return m

    def __call__(self, call, probs: torch.Tensor) -> torch.Tensor | None:
        i = self._step(call)
        frames = self._frames(call)
        t = call.timestep
        plan = self.plan
        chunks = [(c, s) for c, s in (((c, slice(j * call.frames, (j + 1) * call.frames))
                                        for j, c in enumerate(call.cond_or_uncond))) if c == 0 or not plan.only_cond]
        if not chunks:
            return None
        out = probs.clone()
        if call.kind == "cross":
            base = self._store(call).cross_probs(t, call.layer, frames, device=probs.device, window=frames).to(probs.dtype)
            if call.head_range is not None:
                base = base[:, call.head_range[0]:call.head_range[1]]
            if base.shape[-1] != probs.shape[-1]:
                raise ValueError(
                    f"AttentionBlend: the edit's text context has {probs.shape[-1]} tokens, the inversion's "
                    f"{base.shape[-1]}; keep both prompts within 75 tokens"
                )
            a = plan.cross_alphas[i]
            for _, s in chunks:
                out[s] = p2p.cross_control(base, probs[s], a, plan.cross_mode, plan.mapper, plan.refine_alphas,
                                           plan.equalizer)
        else:
            base = self._store(call).self_probs(t, call.layer, frames, device=probs.device, window=frames,
                                         dtype=probs.dtype, head_range=call.head_range)
            if base.shape != probs[chunks[0][1]].shape:
                raise ValueError(
                    f"AttentionBlend: self-attention of layer {call.layer} has {probs.shape[-1]} keys at the edit but "
                    f"{base.shape[-1]} at the inversion. Apply the same TemporalSelfAttentionPatch (same mode) to the "
                    "model used for VideoDDIMInvert and to the model used for the edit sampling."
                )
            mask = None
            if plan.blend_indices:
                mask = self._mask(call, t, call.hw)
                if frames is not None:
                    mask = mask[torch.as_tensor(frames)]
            for _, s in chunks:
                out[s] = p2p.self_fusion(probs[s], base, mask)
        return out
