"""InFusion (Khandelwal, "InFusion: Inject and Attention Fusion for Multi Concept Zero Shot Text based Video
Editing", ICCV-W 2023): the schedule, the injection/fusion formulas, the recorder used during the inversion
and the controller used during the edit sampling. Written from the paper's description; there is no
official code.

The paper's pseudo-code gives the schedule over the edit steps i = 0..N-1 (0 = noisiest):

- **feature phase, i < S1**: in the decoder ResBlocks L, inject the difference of the features obtained
  with the source and with the edit prompt: `f = f_edit + strength * (f_source - f_edit)` (strength 1:
  the source feature replaces the edit's, as Plug-and-Play does), by default only outside the concepts'
  source masks (`FEATURE_REGIONS`; the readings measured are in docs/infusion.md).
- **key/value phase, S1 <= i < S2**: self-attention of the edit queries the source's keys and values:
  `softmax(q_edit k_src^T / sqrt(d)) v_src`, by default only for the query rows outside the concepts' source
  masks (`KV_REGIONS`: inside, the edit's own keys and values; the paper injects them "to query source contents
  and retain unedited concepts"). The concepts' region of both injections is `concept_region`: FateZero's mask
  of the concepts' words united with where they take most of the attention the prompt's words get
  (`masks.word_share_mask`; plain backgrounds). Both chosen on the toy dev split of issue 20 (docs/infusion.md).
- **fusion phase, i >= S2**: masks `Ms` (from the source cross-attention of the source words) and `Me`
  (from the edit cross-attention of the edit words); self-attention `Me * s_edit + (1 - Ms) * s_src`,
  cross-attention `alpha * c_edit + (1 - alpha) * c_src`.

Source features (ResBlock outputs, self-attention keys/values, the attention for the fusion) are recorded
during the DDIM inversion with the source prompt, at the same model timestep as the edit step that reads
them (the inversion evaluates the UNet at sigma_{k+1} on x_k; the edit step that starts at sigma_{k+1}
evaluates it at the same sigma), in fp16 on the CPU, only for the steps of the phase that needs them.

Where the paper is silent we take Plug-and-Play's (Tumanyan et al. 2023) choices and say so:
- layers: features of the ResBlock of decoder (output) block 4 (`up_blocks[1].resnets[1]` in diffusers),
  self-attention of output blocks 4-11;
- windows: the paper orders the phases but gives no values; S1 = 0.5 and S2 = 0.8 are PnP's two
  thresholds (end of its self-attention injection, end of its feature injection) placed in the paper's
  order, so injection spans PnP's first 80% of the steps and the last 20% are fused;
- rows: features and keys/values are injected into the conditional and the unconditional rows (PnP
  injects into both halves of classifier-free guidance); the fusion acts on the conditional rows only
  (its source maps come from the source prompt; FateZero's choice);
- the ResBlock "feature" is the block's output (skip + residual branch); PnP replaces the residual branch
  only. With strength 1 both replace the block's contribution; they differ by the edit's skip path.

Our choices where neither says anything (documented defaults):
- alpha = 0.5; mask threshold 0.3 on the per-frame-normalised map (FateZero/P2P local blend); masks from
  the cross-attention layers closest to 1/4 of the latent resolution (16x16 for SD1.5 at 512x512);
- Me comes from the edit's cross-attention of the *previous* step (when a self-attention layer runs, the
  current step's cross-attention maps are not complete); with no previous step Me = Ms;
- the literal fusion `Me * edit + (1 - Ms) * src` gives attention rows that sum to 0 (inside the source
  object, outside the edited one) or 2 (inside the edited object, outside the source one). We divide by
  the row weight `Me + (1 - Ms)` and use the edit's own map where both weights are 0. Where Me = Ms (0/1)
  this equals the paper's formula.
- Multi-concept: one (source words -> edit words) pair per concept, each with its own Ms_j/Me_j;
  Ms = union_j Ms_j and Me = union_j Me_j enter the fusion. The cross-attention source maps are aligned to
  the edit prompt's tokens with Prompt-to-Prompt's word-swap mapper (refinement when the word counts
  differ) before the alpha mix.

This module does not import ComfyUI.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from . import align, p2p
from .fatezero import mask_layers
from .masks import cross_attention_mask, union, word_share_mask
from .store import (
    AttentionRecorder,
    AttentionStore,
    StoreBudgetError,
    StoreConfig,
    StoreLookupError,
    format_bytes,
)

PNP_FEATURE_BLOCKS = (4,)
PNP_ATTENTION_BLOCKS = tuple(range(4, 12))
DEFAULT_S1 = 0.5
DEFAULT_S2 = 0.8
DEFAULT_ALPHA = 0.5
DEFAULT_THRESHOLD = 0.3


class InFusionConfigError(ValueError):
    """A bad InFusion configuration; the message says what to change."""


# --- parsing and schedule -----------------------------------------------------------------------------


def parse_blocks(text: str, what: str = "blocks") -> tuple[int, ...]:
    """'4' -> (4,); '4-11' -> (4, ..., 11); '4, 6-8' -> (4, 6, 7, 8). Sorted, unique."""
    out: set[int] = set()
    for part in re.split(r"[,;\s]+", str(text or "").strip()):
        if not part:
            continue
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
        if m is None:
            raise InFusionConfigError(f"{what}: '{part}' is not a block number or a range like 4-11")
        a = int(m.group(1))
        b = int(m.group(2)) if m.group(2) is not None else a
        if b < a:
            raise InFusionConfigError(f"{what}: range '{part}' ends before it starts")
        out.update(range(a, b + 1))
    if not out:
        raise InFusionConfigError(f"{what}: give at least one output block number (e.g. 4, or 4-11)")
    return tuple(sorted(out))


def parse_concepts(text: str) -> list[tuple[str, str]]:
    """'cat->dog, red->blue' -> [('cat', 'dog'), ('red', 'blue')]; ',' ';' or newlines separate pairs, each
    side may hold several words ('red car->blue truck')."""
    pairs = []
    for part in re.split(r"[,;\n]", text or ""):
        part = part.strip()
        if not part:
            continue
        sides = re.split(r"\s*(?:->|→|=>)\s*", part)
        if len(sides) != 2 or not sides[0].strip() or not sides[1].strip():
            raise InFusionConfigError(f"concepts: '{part}' is not 'source words->edit words' (e.g. 'cat->dog')")
        pairs.append((sides[0].strip(), sides[1].strip()))
    return pairs


def phase_bounds(num_steps: int, s1: float, s2: float) -> tuple[int, int]:
    """Edit-step boundaries (a, b): features for i < a, keys/values for a <= i < b, fusion for i >= b."""
    if not (0.0 <= s1 <= s2 <= 1.0):
        raise InFusionConfigError(f"the windows must satisfy 0 <= S1 <= S2 <= 1 (got S1={s1:g}, S2={s2:g})")
    return int(num_steps * float(s1)), int(num_steps * float(s2))


def phase_of(step: int, bounds: tuple[int, int]) -> str:
    a, b = bounds
    return "feature" if step < a else ("kv" if step < b else "fusion")


def layer_block(layer: str) -> tuple[str, int] | None:
    """'output_4_0' -> ('output', 4)."""
    parts = layer.split("_")
    if len(parts) < 2 or not parts[1].isdigit():
        return None
    return parts[0], int(parts[1])


def in_blocks(layer: str, blocks: Sequence[int]) -> bool:
    lb = layer_block(layer)
    return lb is not None and lb[0] == "output" and lb[1] in blocks


def edit_step(sample_sigmas, sigma) -> tuple[int | None, int | None]:
    """(edit step index, number of steps) of a model evaluation at `sigma` within `sample_sigmas`.

    Ascending schedules are inversions: the evaluation at sigma index k (1..N) is edit step N - k."""
    if sample_sigmas is None:
        return None, None
    ss = torch.as_tensor(sample_sigmas).detach().float().cpu()
    s = torch.as_tensor(sigma).detach().float().cpu().reshape(-1)[0]
    hits = torch.isclose(ss, s, rtol=1e-4, atol=1e-6).nonzero()
    if len(hits) == 0:
        return None, len(ss) - 1
    k, n = int(hits[0]), len(ss) - 1
    return (n - k if float(ss[0]) < float(ss[-1]) else k), n


def call_step(call) -> int | None:
    """Edit step of an attention call (attention/processor.py AttnCall), if the schedule is known."""
    ss = call.extra.get("sample_sigmas") if call.extra else None
    if ss is None or call.step_index is None or call.total_steps is None:
        return None
    return call.total_steps - call.step_index if float(ss[0]) < float(ss[-1]) else call.step_index


# --- the formulas ---------------------------------------------------------------------------------------


# The paper's feature phase injects "the difference of features obtained with source and edit prompt" to
# "highlight edited concepts"; its sign, scale and region are not given. The readings (docs/infusion.md has their
# figures on the toy benchmark's dev split):
#   mode "source":     f_edit + strength * (f_source - f_edit)   (the difference subtracted from the edit's
#                      features: strength 1 puts the source's feature in, as Plug-and-Play does)
#   mode "difference": f_edit + strength * (f_edit - f_source)   (the difference added: the edit's change
#                      amplified)
#   region "all" / "outside" / "inside": everywhere, only outside or only inside the concepts' source masks.
FEATURE_MODES = ("source", "difference")
FEATURE_REGIONS = ("all", "outside", "inside")
DEFAULT_FEATURE_MODE = "source"
DEFAULT_FEATURE_REGION = "outside"
# Where the key/value phase gives the edit's self-attention the source's keys and values: "all" (every query
# row; Plug-and-Play's reading) or "outside" (only the query rows outside the concepts' source masks, the
# region the feature phase injects into; inside, the edit's own keys/values).
KV_REGIONS = ("all", "outside")
DEFAULT_KV_REGION = "outside"


def inject_difference(edit: torch.Tensor, source: torch.Tensor, strength: float, mode: str = "source",
                      weight: torch.Tensor | None = None) -> torch.Tensor:
    """The feature injection. `edit` [chunks*F, C, H, W], `source` [F, C, H, W] (broadcast per chunk);
    mode "source": f_edit + strength * (f_source - f_edit); "difference": f_edit + strength * (f_edit - f_source);
    `weight` [F, H, W] in [0, 1] limits the change to a region (None: everywhere)."""
    if mode not in FEATURE_MODES:
        raise InFusionConfigError(f"feature mode must be one of {', '.join(FEATURE_MODES)} (got {mode!r})")
    f = source.shape[0]
    e = edit.reshape(-1, f, *edit.shape[1:])
    d = source.to(edit.device, edit.dtype).unsqueeze(0) - e
    if mode == "difference":
        d = -d
    if weight is not None:
        d = d * weight.to(edit.device, edit.dtype).reshape(1, f, 1, *weight.shape[-2:])
    out = e + float(strength) * d
    return out.reshape(edit.shape)


def fuse_self(edit: torch.Tensor, source: torch.Tensor, me: torch.Tensor, ms: torch.Tensor,
              eps: float = 1e-6) -> torch.Tensor:
    """InFusion's self-attention fusion `Me * edit + (1 - Ms) * source`, renormalised per query row (see the
    module doc). edit/source [F, heads, Nq, Nk]; me/ms [F, Nq] in [0, 1] (1 = the concept is there)."""
    we = me.to(edit.device, edit.dtype).reshape(me.shape[0], 1, me.shape[1], 1)
    ws = (1.0 - ms.to(edit.device, edit.dtype)).reshape(ms.shape[0], 1, ms.shape[1], 1)
    total = we + ws
    fused = (we * edit + ws * source) / total.clamp_min(eps)
    return torch.where(total > eps, fused, edit)


def fuse_cross(edit: torch.Tensor, source_aligned: torch.Tensor, alpha: float) -> torch.Tensor:
    """alpha * c_edit + (1 - alpha) * c_source, the source map aligned to the edit prompt's tokens."""
    return float(alpha) * edit + (1.0 - float(alpha)) * source_aligned.to(edit.device, edit.dtype)


# --- what the inversion records -------------------------------------------------------------------------


@dataclass(frozen=True)
class InFusionRecordConfig:
    feature_blocks: tuple[int, ...] = PNP_FEATURE_BLOCKS
    attention_blocks: tuple[int, ...] = PNP_ATTENTION_BLOCKS
    s1: float = DEFAULT_S1
    s2: float = DEFAULT_S2
    fusion_min_factor: int = 2  # fusion layers: query map >= this factor below the latent (FateZero's store)
    budget_bytes: int = 0  # 0: no budget
    dtype: torch.dtype = torch.float16


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


@dataclass(eq=False)
class InFusionRecord:
    """Read-only after recording; lives in `Inversion.records["infusion"]`, shared, never copied.

    features[(timestep, block, window)]: the ResBlock output of output block `block`, conditional rows
    [F, C, H, W];
    kv[(timestep, layer, window)]: {"k", "v"} self-attention keys/values [F (or 1 if shared), Nk, C];
    attention: an AttentionStore (attention/store.py) with the fusion steps' self q/k and cross maps.
    `window` is None for a whole-clip recording, else the absolute frame indices of a context window: under
    context windows every window's features and keys/values are kept (they depend on the window's frames
    through temporal attention) and the edit reads the entry of the same window, as the attention store does."""

    config: InFusionRecordConfig
    frames: int | None = None
    num_steps: int | None = None
    features: dict = field(default_factory=dict)
    kv: dict = field(default_factory=dict)
    attention: AttentionStore | None = None
    _own_bytes: int = 0

    def __deepcopy__(self, memo):
        return self

    @property
    def nbytes(self) -> int:
        return self._own_bytes + (self.attention.nbytes if self.attention is not None else 0)

    def _check_budget(self, new: int) -> None:
        b = self.config.budget_bytes
        if b and self.nbytes + new > b:
            raise StoreBudgetError(
                f"the InFusion source record needs more than its memory budget of {format_bytes(b)}. Use fewer "
                "frames, fewer feature/attention blocks, smaller windows, or raise memory_budget_gb."
            )

    def _put(self, table: dict, key, value) -> None:
        new = sum(_nbytes(v) for v in value.values()) if isinstance(value, dict) else _nbytes(value)
        old = table.get(key)
        if old is not None:
            self._own_bytes -= sum(_nbytes(v) for v in old.values()) if isinstance(old, dict) else _nbytes(old)
        self._check_budget(new)
        table[key] = value
        self._own_bytes += new

    def add_feature(self, timestep: int, block: int, feat: torch.Tensor, window=None) -> None:
        self._put(self.features, (int(timestep), int(block), _win(window)), feat)

    def add_kv(self, timestep: int, layer: str, k: torch.Tensor, v: torch.Tensor, window=None) -> None:
        self._put(self.kv, (int(timestep), layer, _win(window)), {"k": k, "v": v})

    def feature(self, timestep: int, block: int, window=None) -> torch.Tensor:
        f = self.features.get((int(timestep), int(block), _win(window)))
        if f is None:
            raise StoreLookupError(f"no recorded ResBlock feature of output block {block} at timestep {timestep}"
                                   + _window_hint(window))
        return f

    def kv_at(self, timestep: int, layer: str, window=None) -> dict:
        e = self.kv.get((int(timestep), layer, _win(window)))
        if e is None:
            raise StoreLookupError(f"no recorded self-attention keys/values for layer {layer} at timestep {timestep}"
                                   + _window_hint(window))
        return e

    def feature_timesteps(self) -> set[int]:
        return {k[0] for k in self.features}

    def kv_layers(self) -> set[str]:
        return {k[1] for k in self.kv}

    def kv_timesteps(self) -> set[int]:
        return {k[0] for k in self.kv}

    def summary(self) -> str:
        att = self.attention.nbytes if self.attention is not None else 0
        n_att = len(self.attention.timesteps) if self.attention is not None else 0
        return (
            f"InFusion source record: {self.frames} frame(s); features {len(self.feature_timesteps())} step(s) x "
            f"blocks {list(self.config.feature_blocks)}, keys/values {len(self.kv_timesteps())} step(s) x "
            f"{len(self.kv_layers())} layer(s), fusion attention {n_att} step(s); {self.nbytes} bytes "
            f"({self.nbytes / 2**20:.2f} MiB, fp16 on CPU; attention store {att} bytes)"
        )


def _win(window) -> tuple[int, ...] | None:
    return None if window is None else tuple(int(i) for i in window)


def _window_hint(window) -> str:
    if window is None:
        return ""
    return (f" for the context window {list(window)}: sample the edit with the same context windows as the "
            "inversion")


class InFusionRecorder:
    """Records during one inversion run. An attention processor (dispatcher: `process_kv` for the keys/values,
    `active`/`__call__` for the fusion attention, delegated to the pack's AttentionRecorder) and a feature sink
    (`feature_targets`, used by the DIFFUSION_MODEL wrapper's scoped ResBlock hooks)."""

    def __init__(self, config: InFusionRecordConfig):
        self.config = config
        self.record = InFusionRecord(config=config)
        self._attn = AttentionRecorder(StoreConfig(record_window=1.0, min_factor=config.fusion_min_factor,
                                                   budget_bytes=0, dtype=config.dtype))

    def _frames(self, frames: int, total: int | None, window=None) -> None:
        r = self.record
        if window is not None:  # the clip's length: the largest frame index seen by a window
            r.frames, r.num_steps = max(r.frames or 0, max(window) + 1), total
        elif r.frames is None:
            r.frames, r.num_steps = int(frames), total
        elif r.frames != frames:
            raise ValueError(f"InFusion record: a call with {frames} frames in a recording of {r.frames}")

    def _phase(self, step: int | None, total: int | None) -> str | None:
        if step is None or total is None:
            return None
        return phase_of(step, phase_bounds(total, self.config.s1, self.config.s2))

    # features ------------------------------------------------------------------------------------------
    def feature_targets(self, timestep: int, step: int | None, total: int | None, cond_or_uncond: list[int],
                        batch: int, frame_index: list[int] | None = None) -> dict:
        """{block: fn(output) -> None} for the ResBlocks to read in this evaluation (empty: no hooks)."""
        if 0 not in cond_or_uncond or self._phase(step, total) != "feature":
            return {}
        frames = batch // max(1, len(cond_or_uncond))
        rows = [i * frames + f for i, c in enumerate(cond_or_uncond) if c == 0 for f in range(frames)]

        def make(block):
            def read(out):
                self._frames(frames, total, frame_index)
                idx = torch.as_tensor(rows, device=out.device)
                self.record.add_feature(timestep, block, out.index_select(0, idx).detach().to("cpu", self.config.dtype),
                                        window=frame_index)
                return None
            return read

        return {b: make(b) for b in self.config.feature_blocks}

    # attention -----------------------------------------------------------------------------------------
    def process_kv(self, call, k, v):
        if call.kind != "self" or 0 not in call.cond_or_uncond or not in_blocks(call.layer, self.config.attention_blocks):
            return None
        if self._phase(call_step(call), call.total_steps) != "kv":
            return None
        self._frames(call.frames, call.total_steps, call.frame_index)
        idx = torch.as_tensor(call.rows(0), device=k.device)
        ks = k.index_select(0, idx).detach().to("cpu", self.config.dtype)
        vs = v.index_select(0, idx).detach().to("cpu", self.config.dtype)
        if ks.shape[0] > 1 and torch.equal(ks, ks[:1].expand_as(ks)) and torch.equal(vs, vs[:1].expand_as(vs)):
            ks, vs = ks[:1].clone(), vs[:1].clone()  # every frame attends to the same key frames
        self.record.add_kv(call.timestep, call.layer, ks, vs, window=call.frame_index)
        return None

    def needs_probs(self, call) -> bool:
        return self._attn.needs_probs(call)

    def kinds(self, call) -> set[int]:
        return {0}

    def active(self, call) -> bool:
        if not in_blocks(call.layer, self.config.attention_blocks):
            return False
        if self._phase(call_step(call), call.total_steps) != "fusion":
            return False
        return self._attn.active(call)

    def __call__(self, call, probs):
        self._frames(call.frames, call.total_steps, call.frame_index)
        out = self._attn(call, probs)
        self.record.attention = self._attn.store  # counted in the record's bytes (and budget) from now on
        self.record._check_budget(0)
        return out

    def finalize(self) -> InFusionRecord:
        self.record.attention = self._attn.finalize()
        return self.record


class InFusionRecordSpec:
    """A record spec (nodes/_comfy.py run_inversion): a fresh recorder per inversion run."""

    def __init__(self, config: InFusionRecordConfig):
        self.config = config

    def __deepcopy__(self, memo):
        return self

    def new_recorder(self) -> InFusionRecorder:
        return InFusionRecorder(self.config)


# --- the edit ------------------------------------------------------------------------------------------


@dataclass(eq=False)
class Concept:
    label: str  # "cat->dog"
    source_indices: list[int]  # token positions in the source prompt
    edit_indices: list[int]  # token positions in the edit prompt


@dataclass(eq=False)
class InFusionPlan:
    num_steps: int
    timestep_to_step: dict  # model timestep -> edit step (0 = noisiest)
    bounds: tuple[int, int]
    feature_blocks: tuple[int, ...]
    attention_blocks: tuple[int, ...]
    strength: float = 1.0
    feature_mode: str = DEFAULT_FEATURE_MODE
    feature_region: str = DEFAULT_FEATURE_REGION
    kv_region: str = DEFAULT_KV_REGION
    region_share: bool = True  # the concepts' region also where they take most of the prompt words' attention
    source_words: tuple = ()  # context positions of the source prompt's words (BOS and end-of-text excluded)
    alpha: float = DEFAULT_ALPHA
    threshold: float = DEFAULT_THRESHOLD
    mask_factor: int = 4
    inject_uncond: bool = True
    cross_mode: str = "none"  # replace | refine | none (same prompt)
    mapper: torch.Tensor | None = None
    refine_alphas: torch.Tensor | None = None
    concepts: list = field(default_factory=list)
    end_of_text: int | None = None  # the edit's own maps from this context position on (None: the source's)
    notes: list = field(default_factory=list)

    def __deepcopy__(self, memo):
        return self

    def steps_of(self, phase: str) -> list[int]:
        return [i for i in range(self.num_steps) if phase_of(i, self.bounds) == phase]

    def timestep_of_step(self, i: int) -> int:
        for t, s in self.timestep_to_step.items():
            if s == i:
                return t
        raise KeyError(i)


def _side_indices(prompt: str, words: str, tokenizer, which: str, label: str) -> list[int]:
    try:
        return align.phrase_positions(prompt, [words], tokenizer, which)[0] if words.split() else []
    except align.WordNotInPrompt as e:
        raise InFusionConfigError(f"concepts '{label}': {e}") from None


def make_plan(tokenizer, source: str, edit: str, concepts: str, inversion_timesteps: Sequence[int],
              feature_blocks: Sequence[int] = PNP_FEATURE_BLOCKS, attention_blocks: Sequence[int] = PNP_ATTENTION_BLOCKS,
              s1: float = DEFAULT_S1, s2: float = DEFAULT_S2, strength: float = 1.0, alpha: float = DEFAULT_ALPHA,
              threshold: float = DEFAULT_THRESHOLD, inject_uncond: bool = True, mask_factor: int = 4,
              feature_mode: str = DEFAULT_FEATURE_MODE, feature_region: str = DEFAULT_FEATURE_REGION,
              end_of_text_maps: str = "edit", kv_region: str = DEFAULT_KV_REGION,
              region_share: bool = True) -> InFusionPlan:
    """Translate the edit settings into an InFusionPlan (token alignment, concept indices, schedule).
    feature_mode / feature_region: the reading of the feature injection (`inject_difference`).
    end_of_text_maps: "edit" (the edit prompt's end-of-text token and padding keep their own cross-attention maps
    in the fusion phase; the pack's default) or "source" (P2P's): `attention/p2p.py`."""
    if feature_mode not in FEATURE_MODES:
        raise InFusionConfigError(f"feature mode must be one of {', '.join(FEATURE_MODES)} (got {feature_mode!r})")
    if feature_region not in FEATURE_REGIONS:
        raise InFusionConfigError(f"feature region must be one of {', '.join(FEATURE_REGIONS)} "
                                  f"(got {feature_region!r})")
    if kv_region not in KV_REGIONS:
        raise InFusionConfigError(f"kv region must be one of {', '.join(KV_REGIONS)} (got {kv_region!r})")
    ts = list(inversion_timesteps)
    n = len(ts) - 1
    if n < 1:
        raise InFusionConfigError("the inversion has no steps")
    source, edit = (source or "").strip(), (edit or "").strip()
    if not source or not edit:
        raise InFusionConfigError("give both the source prompt (the text the video was inverted with) and the edit prompt")
    if not (0.0 <= alpha <= 1.0):
        raise InFusionConfigError(f"alpha must be in [0, 1] (got {alpha:g})")
    if end_of_text_maps not in p2p.END_OF_TEXT_MAPS:
        raise InFusionConfigError(f"end_of_text_maps must be one of {', '.join(p2p.END_OF_TEXT_MAPS)} "
                                  f"(got {end_of_text_maps!r})")
    bounds = phase_bounds(n, s1, s2)
    notes: list[str] = []
    mapper = refine_alphas = eot = None
    try:
        if source == edit:
            cross_mode = "none"
        elif align.word_count(source) == align.word_count(edit):
            cross_mode = "replace"
            mapper = align.replacement_mapper(source, edit, tokenizer)
        else:
            cross_mode = "refine"
            mapper, refine_alphas = align.refinement_mapper(source, edit, tokenizer)
            notes.append("the prompts have different word counts: source cross-attention is aligned by token "
                         "refinement (new words keep the edit's own maps)")
        if cross_mode != "none" and end_of_text_maps == "edit":
            eot = align.end_of_text(edit, tokenizer)
        items = []
        for a, b in parse_concepts(concepts):
            label = f"{a}->{b}"
            items.append(Concept(label, _side_indices(source, a, tokenizer, "source", label),
                                 _side_indices(edit, b, tokenizer, "edit", label)))
    except align.AlignmentError as e:
        raise InFusionConfigError(str(e)) from None
    if not items:
        notes.append("no concepts given: the fusion phase replaces self-attention by the source's everywhere "
                     "(Ms = Me = 0), a global edit")
    step_of = {int(ts[k]): n - k for k in range(1, n + 1)}
    return InFusionPlan(num_steps=n, timestep_to_step=step_of, bounds=bounds, feature_blocks=tuple(feature_blocks),
                        attention_blocks=tuple(attention_blocks), strength=float(strength),
                        feature_mode=feature_mode, feature_region=feature_region if items else "all",
                        kv_region=kv_region if items else "all", region_share=bool(region_share),
                        source_words=tuple(range(1, align.end_of_text(source, tokenizer))),
                        alpha=float(alpha),
                        threshold=float(threshold), mask_factor=int(mask_factor), inject_uncond=bool(inject_uncond),
                        cross_mode=cross_mode, mapper=mapper, refine_alphas=refine_alphas, concepts=items,
                        end_of_text=eot, notes=notes)


def check_record(record: InFusionRecord, plan: InFusionPlan, hint: str = "") -> None:
    """Raise InFusionConfigError if the record lacks what the plan reads (steps, blocks, layers)."""
    cfg = record.config
    rerun = hint or "re-run the inversion with the InFusion source settings matching the edit"
    missing_blocks = [b for b in plan.feature_blocks if b not in cfg.feature_blocks]
    if missing_blocks and plan.steps_of("feature"):
        raise InFusionConfigError(f"feature blocks {missing_blocks} were not recorded (recorded: "
                                  f"{list(cfg.feature_blocks)}); {rerun}")
    missing_att = [b for b in plan.attention_blocks if b not in cfg.attention_blocks]
    if missing_att and (plan.steps_of("kv") or plan.steps_of("fusion")):
        raise InFusionConfigError(f"attention blocks {missing_att} were not recorded (recorded: "
                                  f"{list(cfg.attention_blocks)}); {rerun}")
    if plan.feature_region != "all" and plan.concepts and plan.steps_of("feature") and not plan.steps_of("fusion"):
        raise InFusionConfigError(
            "the feature injection is limited to outside (or inside) the concepts' source masks, which come from the "
            "source cross-attention of the fusion steps, and these settings have none: give kv_end (S2) below 1 on "
            "both InFusion nodes")
    if plan.kv_region != "all" and plan.concepts and plan.steps_of("kv") and not plan.steps_of("fusion"):
        raise InFusionConfigError(
            "the key/value injection is limited to outside the concepts' source masks, which come from the source "
            "cross-attention of the fusion steps, and these settings have none: give kv_end (S2) below 1 on both "
            "InFusion nodes")
    ft, kvt = record.feature_timesteps(), record.kv_timesteps()
    att = record.attention
    for phase, have, what in (("feature", ft, "ResBlock features"), ("kv", kvt, "self-attention keys/values"),
                              ("fusion", set(att.timesteps) if att is not None else set(), "fusion attention")):
        for i in plan.steps_of(phase):
            t = plan.timestep_of_step(i)
            if t not in have:
                raise InFusionConfigError(
                    f"edit step {i} of {plan.num_steps} is in the {phase} phase but the inversion recorded no {what} "
                    f"for it (recorded windows S1={cfg.s1:g}, S2={cfg.s2:g}); use the same S1/S2 as the source "
                    f"record, or {rerun}"
                )


class InFusionController:
    """The edit: an attention processor (dispatcher protocol + `process_kv`) and a feature source for the
    DIFFUSION_MODEL wrapper's scoped ResBlock hooks. Reads the record only. `counts` tallies what ran per
    phase (features injected, keys/values replaced, attention calls fused) for the UI and the tests."""

    SELF_ATTENTION_CONTROL = True  # attention/processor.py check_company

    def __init__(self, record: InFusionRecord, plan: InFusionPlan):
        self.record = record
        self.plan = plan
        att = record.attention
        self._kv_layers = {lay for lay in record.kv_layers() if in_blocks(lay, plan.attention_blocks)}
        self._self_layers = set()
        self._cross_layers = set()
        self._mask_layers: list[str] = []
        if att is not None:
            self._self_layers = {lay for lay in att.layer_names("self") if in_blocks(lay, plan.attention_blocks)}
            self._cross_layers = {lay for lay in att.layer_names("cross") if in_blocks(lay, plan.attention_blocks)}
            self._mask_layers = mask_layers(att, plan.mask_factor) if plan.concepts else []
        self._edit_maps: dict = {}  # edit step -> {mask layer: head-mean edit cross map [F, Nq, T]}
        self._masks: dict = {}
        self.counts = {"feature": 0, "kv": 0, "fusion_self": 0, "fusion_cross": 0}  # accumulate over runs

    def __deepcopy__(self, memo):
        return self

    def step(self, timestep: int) -> int:
        i = self.plan.timestep_to_step.get(int(timestep))
        if i is None:
            n = self.plan.num_steps
            raise StoreLookupError(
                f"InFusionInject: the edit sampler evaluated the model at timestep {timestep}, which is not a step of "
                f"the inversion ({n} DDIM steps). Sample the edit with the same number of steps ({n}) and the "
                "ddim_uniform scheduler (sampler ddim or euler, add_noise disabled, from the inversion's z_T)."
            )
        return i

    def _check_frames(self, frames: int, frame_index=None) -> None:
        if frame_index is not None:
            if self.record.frames is not None and max(frame_index) >= self.record.frames:
                raise ValueError(f"InFusionInject: frame {max(frame_index)} requested, the inversion recorded "
                                 f"{self.record.frames} frame(s).")
            return
        if self.record.frames is not None and frames != self.record.frames:
            raise ValueError(
                f"InFusionInject: the edit samples {frames} frame(s) but the inversion recorded {self.record.frames}. "
                "Edit the frames you inverted (use the inversion's z_T as the sampler's latent)."
            )

    def _chunks(self, cond_or_uncond, frames, fusion: bool) -> list[slice]:
        return [slice(j * frames, (j + 1) * frames) for j, c in enumerate(cond_or_uncond)
                if c == 0 or (not fusion and self.plan.inject_uncond)]

    # features ------------------------------------------------------------------------------------------
    def feature_targets(self, timestep: int, cond_or_uncond: list[int], batch: int,
                        frame_index: list[int] | None = None) -> dict:
        i = self.step(timestep)
        if phase_of(i, self.plan.bounds) != "feature" or self.plan.strength == 0.0:
            return {}
        frames = batch // max(1, len(cond_or_uncond))
        self._check_frames(frames, frame_index)
        chunks = self._chunks(cond_or_uncond, frames, fusion=False)
        if not chunks:
            return {}

        def make(block):
            src = self.record.feature(timestep, block, window=frame_index)  # a context window's own entry

            def inject(out):
                new = out.clone()
                s = src.to(out.device, out.dtype)
                if s.shape[1:] != out.shape[1:]:
                    raise ValueError(f"InFusionInject: the recorded feature of output block {block} has shape "
                                     f"{list(s.shape[1:])}, the edit's {list(out.shape[1:])}: edit at the inverted "
                                     "resolution")
                weight = self.feature_weight(tuple(out.shape[-2:]), frame_index)
                for sl in chunks:
                    new[sl] = inject_difference(out[sl], s, self.plan.strength, self.plan.feature_mode, weight)
                self.counts["feature"] += 1
                return new
            return inject

        return {b: make(b) for b in self.plan.feature_blocks}

    # attention -----------------------------------------------------------------------------------------
    def _source_kv(self, call, k, v) -> tuple[torch.Tensor, torch.Tensor]:
        """The recorded source keys/values of the call's step, layer and context window ([1 or F, Nk, C]), in the
        edit's device and dtype; raises when their key count differs from the edit's (another temporal mode)."""
        e = self.record.kv_at(call.timestep, call.layer, window=call.frame_index)
        ks, vs = e["k"].to(k.device, k.dtype), e["v"].to(v.device, v.dtype)
        if ks.shape[1:] != k.shape[1:]:
            raise ValueError(
                f"InFusionInject: self-attention of layer {call.layer} has {k.shape[1]} keys at the edit but "
                f"{ks.shape[1]} at the inversion. Apply the same Temporal Self-Attention (same mode) to the models "
                "of the inversion and of the edit."
            )
        return ks, vs

    def check_company(self, processors) -> None:
        """Before the first UNet call of a run (nodes/_attn_patch.py): the key/value phase outside the concepts is
        computed at the output level (`attend_output`), which the dispatcher uses only when no other processor
        needs the same call's probabilities; another self-attention controller on the model is refused here
        instead of at the key/value phase's first step."""
        if self.plan.kv_region == "all" or not self.plan.concepts or not self.plan.steps_of("kv"):
            return
        others = [p for p in processors if p is not self and getattr(p, "SELF_ATTENTION_CONTROL", False)]
        if others:
            raise InFusionConfigError(
                f"InFusionInject: another self-attention control is on the same edit model "
                f"({type(others[0]).__name__}: Attention Blend or the Video-P2P Guider). InFusion's key/value phase "
                "gives the source keys/values to the rows outside its concepts and cannot share those attention calls "
                "with it: keep one self-attention editing node on the edit model, or give InFusion Inject no "
                "key/value phase (kv_end equal to feature_end, on both InFusion nodes).")

    def _kv_masked(self, call) -> bool:
        """A key/value-phase self-attention call whose source keys/values act only outside the concepts
        (kv_region "outside"): answered by `attend_output`, not by replacing the keys/values."""
        return (self.plan.kv_region == "outside" and bool(self.plan.concepts) and call.kind == "self"
                and call.layer in self._kv_layers and phase_of(self.step(call.timestep), self.plan.bounds) == "kv")

    def process_kv(self, call, k, v):
        if call.kind != "self" or call.layer not in self._kv_layers:
            return None
        i = self.step(call.timestep)
        if phase_of(i, self.plan.bounds) != "kv" or self._kv_masked(call):
            return None
        self._check_frames(call.frames, call.frame_index)
        chunks = self._chunks(call.cond_or_uncond, call.frames, fusion=False)
        if not chunks:
            return None
        ks, vs = self._source_kv(call, k, v)
        k2, v2 = k.clone(), v.clone()
        for sl in chunks:
            k2[sl] = ks.expand(call.frames, -1, -1)
            v2[sl] = vs.expand(call.frames, -1, -1)
        self.counts["kv"] += 1
        return k2, v2

    def active(self, call) -> bool:
        if self._kv_masked(call):
            return bool(self._chunks(call.cond_or_uncond, call.frames, fusion=False))
        if 0 not in call.cond_or_uncond:
            return False
        i = self.step(call.timestep)
        b = self.plan.bounds[1]
        if call.kind == "cross":
            if call.layer in self._mask_layers and i >= b - 1:
                return True  # read the edit's own maps for Me (the next step's mask)
            return i >= b and call.layer in self._cross_layers
        return i >= b and call.layer in self._self_layers

    def concept_region(self, hw) -> torch.Tensor:
        """[F, H, W] 0/1: where the concepts are, from the source cross-attention averaged over every recorded
        (fusion-phase, low-noise) step of the inversion: the union of the concepts' FateZero masks and, with
        `plan.region_share`, of where their words take over half the attention given to the source prompt's words
        (`masks.word_share_mask`: a plain background word is weak everywhere but at a few peaks, its FateZero mask
        a corner; toy dev split of issue 20, docs/infusion.md). The feature and key/value injections act outside
        it. Cached."""
        key = ("region", tuple(hw))
        got = self._masks.get(key)
        if got is not None:
            return got
        att = self.record.attention
        if att is None or not att.timesteps or not self._mask_layers:
            raise InFusionConfigError(
                "InFusionInject: the injection inside/outside the concepts needs the source cross-attention "
                "of the fusion steps; give kv_end (S2) below 1 on both nodes")
        hws = [att.layers[lay].hw for lay in self._mask_layers]
        maps = [torch.stack([att.cross_mean(t, lay) for t in att.timesteps]).mean(0) for lay in self._mask_layers]
        got = union(*[cross_attention_mask(maps, hws, c.source_indices, hw, threshold=self.plan.threshold)
                      for c in self.plan.concepts])
        if self.plan.region_share:  # plain backgrounds: where the concept has most of the words' attention
            words = list(self.plan.source_words)
            got = union(got, *[word_share_mask(maps, hws, c.source_indices, words, hw) for c in self.plan.concepts])
        self._masks[key] = got
        return got

    def feature_weight(self, hw, frame_index=None) -> torch.Tensor | None:
        """The injection's region weight [F, H, W] (None: everywhere)."""
        region = self.plan.feature_region
        if region == "all" or not self.plan.concepts:
            return None
        m = self.concept_region(hw)
        if frame_index is not None:
            m = m[torch.as_tensor(list(frame_index))]
        return m if region == "inside" else 1.0 - m

    # dispatcher protocol extensions (attention/processor.py) --------------------------------------------
    def kinds(self, call) -> set[int]:
        if self._kv_masked(call):
            return {0, 1} if self.plan.inject_uncond else {0}
        return {0}

    def splits_heads(self, call) -> bool:
        return call.kind == "self"

    def attend_output(self, call, attend) -> torch.Tensor | None:
        """The self-attention fusion at the level of the output with optimized attention only: the per-row
        weights of `fuse_self` give (Me * attend(q, k, v) + (1 - Ms) * attend(q_src, k_src, v)) / (Me + 1 - Ms),
        attend(q, k, v) where both weights are 0. Exact: the same probs @ v as __call__."""
        if call.kind != "self":
            return None
        i = self.step(call.timestep)
        self._check_frames(call.frames, call.frame_index)
        if self._kv_masked(call):
            return self._attend_kv_outside(call, attend)
        if i < self.plan.bounds[1]:
            return None
        q, k, v = call.q, call.k, call.v
        chunks = self._chunks(call.cond_or_uncond, call.frames, fusion=True)
        if len(chunks) != len(call.cond_or_uncond):
            return None  # not the dispatcher's restricted call: explicit path
        win = call.frame_index
        qs, ks = self.record.attention.self_qk(call.timestep, call.layer, device=q.device, window=win)
        if ks.shape[1] != k.shape[1] or qs.shape[1:] != q.shape[1:]:
            raise ValueError(
                f"InFusionInject: self-attention of layer {call.layer} has {k.shape[1]} keys at the edit but "
                f"{ks.shape[1]} at the inversion. Apply the same Temporal Self-Attention to both models.")
        me, ms = self.masks(i, call.timestep, call.hw)
        if win is not None:
            sel = torch.as_tensor(list(win), device=me.device)
            me, ms = me[sel], ms[sel]
        n = len(chunks)
        we = me.to(q.device, v.dtype).repeat(n, 1).unsqueeze(-1)
        ws = (1.0 - ms.to(q.device, v.dtype)).repeat(n, 1).unsqueeze(-1)
        total = we + ws
        edit = attend(q, k, v)
        src = attend(qs.to(q.dtype).repeat(n, 1, 1), ks.to(k.dtype).repeat(n, 1, 1), v)
        fused = (we * edit + ws * src) / total.clamp_min(1e-6)
        self.counts["fusion_self"] += 1
        return torch.where(total > 1e-6, fused, edit).to(edit.dtype)

    def _attend_kv_outside(self, call, attend) -> torch.Tensor | None:
        """Key/value phase, kv_region "outside": w * attend(q, k_src, v_src) + (1 - w) * attend(q, k, v) per query
        row, w = 1 outside the concepts' source masks (`concept_region`), 0 inside."""
        chunks = self._chunks(call.cond_or_uncond, call.frames, fusion=False)
        if len(chunks) != len(call.cond_or_uncond):
            return None
        q, k, v = call.q, call.k, call.v
        ks, vs = self._source_kv(call, k, v)
        n = len(chunks)
        m = self.concept_region(call.hw)
        if call.frame_index is not None:
            m = m[torch.as_tensor(list(call.frame_index))]
        w = (1.0 - m).reshape(m.shape[0], -1).to(q.device, v.dtype).repeat(n, 1).unsqueeze(-1)
        src = attend(q, ks.expand(call.frames, -1, -1).repeat(n, 1, 1), vs.expand(call.frames, -1, -1).repeat(n, 1, 1))
        own = attend(q, k, v)
        self.counts["kv"] += 1
        return (w * src + (1.0 - w) * own).to(own.dtype)

    def _edit_masks(self, i: int, hw) -> torch.Tensor | None:
        prev = self._edit_maps.get(i - 1)
        if not prev or any(lay not in prev for lay in self._mask_layers):
            return None
        att = self.record.attention
        maps = [prev[lay] for lay in self._mask_layers]
        hws = [att.layers[lay].hw for lay in self._mask_layers]
        return torch.stack([cross_attention_mask(maps, hws, c.edit_indices, hw, threshold=self.plan.threshold)
                            for c in self.plan.concepts])

    def source_masks(self, timestep: int, hw) -> torch.Tensor:
        """[concepts, F, H, W] 0/1 masks Ms_j from the recorded source cross-attention at `timestep`."""
        att = self.record.attention
        maps = [att.cross_mean(timestep, lay) for lay in self._mask_layers]
        hws = [att.layers[lay].hw for lay in self._mask_layers]
        return torch.stack([cross_attention_mask(maps, hws, c.source_indices, hw, threshold=self.plan.threshold)
                            for c in self.plan.concepts])

    def masks(self, i: int, timestep: int, hw) -> tuple[torch.Tensor, torch.Tensor]:
        """(Me, Ms) for the fusion at edit step i, [F, Nq] each (unions over the concepts)."""
        key = (i, tuple(hw))
        got = self._masks.get(key)
        if got is not None:
            return got
        frames = self.record.frames
        if not self.plan.concepts:
            z = torch.zeros(frames, hw[0] * hw[1])
            got = (z, z)
        else:
            ms_j = self.source_masks(timestep, hw)
            me_j = self._edit_masks(i, hw)
            if me_j is None:
                me_j = ms_j
            got = (union(*me_j).reshape(frames, -1), union(*ms_j).reshape(frames, -1))
        self._masks = {k: v for k, v in self._masks.items() if k[0] in (i, "region")}
        self._masks[key] = got
        return got

    def __call__(self, call, probs: torch.Tensor) -> torch.Tensor | None:
        if self._kv_masked(call):
            raise InFusionConfigError(
                f"InFusionInject: the key/value phase at layer {call.layer} needs the attention output alone, but "
                "another attention processor of the pack reads this self-attention call too: keep one "
                "self-attention editing node on the edit model, or set kv_end equal to feature_end on both InFusion "
                "nodes (no key/value phase)")
        i = self.step(call.timestep)
        self._check_frames(call.frames, call.frame_index)
        b = self.plan.bounds[1]
        t = call.timestep
        win = call.frame_index
        chunks = self._chunks(call.cond_or_uncond, call.frames, fusion=True)
        if call.kind == "cross" and call.layer in self._mask_layers and i >= b - 1 and not call.guidance:
            # (the edit masks come from the main pass, never from another node's guidance pass)
            maps = self._edit_maps.setdefault(i, {})
            m = probs[chunks[0]].float().mean(1).detach()
            if win is not None:  # a context window writes its frames into the clip's map
                full = maps.get(call.layer)
                if full is None:
                    full = m.new_zeros((self.record.frames,) + tuple(m.shape[1:]))
                full[torch.as_tensor(list(win), device=m.device)] = m
                m = full
            maps[call.layer] = m
            for old in [s for s in self._edit_maps if s < i - 1]:
                del self._edit_maps[old]
            # masks of step i+1 depend on these maps: never reuse ones cached by an earlier run
            self._masks = {k: v for k, v in self._masks.items() if k[0] != i + 1}
        if i < b:
            return None
        att = self.record.attention
        out = probs.clone()
        if call.kind == "cross":
            if call.layer not in self._cross_layers:
                return None
            base = att.cross_probs(t, call.layer, device=probs.device, window=win).to(probs.dtype)
            if call.head_range is not None:
                base = base[:, call.head_range[0]:call.head_range[1]]
            if base.shape[-1] != probs.shape[-1]:
                raise ValueError(f"InFusionInject: the edit's text context has {probs.shape[-1]} tokens, the "
                                 f"inversion's {base.shape[-1]}; keep both prompts within 75 tokens")
            a = torch.full((probs.shape[-1],), 1.0 - self.plan.alpha)
            if self.plan.end_of_text is not None:
                a = p2p.own_end_of_text(a, self.plan.end_of_text, "edit")
            for sl in chunks:
                # p2p.cross_control aligns the source map (word swap / refinement) and mixes with weight a
                out[sl] = p2p.cross_control(base, probs[sl], a, self.plan.cross_mode, self.plan.mapper,
                                            self.plan.refine_alphas)
            self.counts["fusion_cross"] += 1
            return out
        base = att.self_probs(t, call.layer, device=probs.device, window=win, dtype=probs.dtype,
                              head_range=call.head_range)
        if base.shape != probs[chunks[0]].shape:
            raise ValueError(
                f"InFusionInject: self-attention of layer {call.layer} has {probs.shape[-1]} keys at the edit but "
                f"{base.shape[-1]} at the inversion. Apply the same Temporal Self-Attention to both models."
            )
        me, ms = self.masks(i, t, call.hw)
        if win is not None:
            sel = torch.as_tensor(list(win), device=me.device)
            me, ms = me[sel], ms[sel]
        for sl in chunks:
            out[sl] = fuse_self(probs[sl], base, me, ms)
        if call.head_range is None or call.head_range[0] == 0:  # once per call, not per chunk of heads
            self.counts["fusion_self"] += 1
        return out
