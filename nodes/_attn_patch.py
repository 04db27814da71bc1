"""The pack's one attention hook: a dispatcher installed as the attn1/attn2 replace patch of every
transformer block of a cloned model, which hands attention probabilities to the processors of
attention/processor.py (recorders, controllers, mask makers), and composes with every other pack's
attention patch (docs/ARCHITECTURE.md, "Composition with other packs").

- Installed only through ComfyUI's public mechanisms on a clone: replace patches on the
  (block, number, index) keys, three keyed wrappers (DIFFUSION_MODEL, PREDICT_NOISE, OUTER_SAMPLE) and
  one post-CFG function. Nothing is monkeypatched.
- Another pack's patch for the same call is looked up when the call happens, the way ComfyUI itself would
  have found it without the pack: the patch that was on (block, number, index) before our dispatcher
  (kept at install time), else the one on (block, number) in the call's own transformer options (PAG sets
  its patch there inside its guidance pass, IPAdapter for SD1.5 at install time). BasicTransformerBlock
  hands patches extra_options without `patches_replace`, so a DIFFUSION_MODEL wrapper puts the UNet
  call's `patches_replace` into the transformer options under PATCHES_KEY for the dispatchers to read.
- A patch put on (block, number, index) after the pack's nodes replaces a dispatcher in the model options;
  the same wrapper finds it at every UNet call (so at the start of the run), puts a dispatcher back in that
  call's options and has it call the patch (REPLACED_KEY), logging once per run what it did.
- Composition (`_Dispatcher._compose`): when no processor changed the call, the other patch's output is
  the output. When one did ("ours" = the edited probabilities @ v), the other patch is called with the same
  q, k, v and:
  * if it called back into the pack's dispatcher (it chains to what it replaced), that call returned
    "ours", and the patch's own output is the result: exact;
  * if it returned the values themselves (identity attention: PAG's perturbation), it replaced the
    probabilities outright and its output is the result: exact;
  * otherwise out = ours + (patch(q, k, v) - attention(q, k, v)): exact for a patch that adds a term to
    attention or only reads it (IPAdapter-style decoupled cross-attention, SAG's recorder, faster
    kernels). A patch that changes the term by more than rounding and is not known to be additive gets a
    warning once per run (log and the running node's UI text): the rule is then a first-order combination.
- Guidance passes of other nodes (calls made by a post-CFG function, e.g. PAG's and SAG's extra UNet
  evaluations) are marked in AttnCall.guidance: recorders (`zsve_recorders`) do not run there, and chunk
  kinds are those of the step's main pass (see attention/processor.py).
- Processors are looked up per call in transformer_options: `zsve_processors` (a list, set by nodes on
  the model) and `zsve_recorders` (a dict, set per run by VideoDDIMInvert). Idempotent: installing twice
  does not stack dispatchers.
"""

from __future__ import annotations

import contextvars
import dataclasses
import logging
from dataclasses import dataclass, field

import comfy.model_patcher
import comfy.patcher_extension
import torch
from comfy.ldm.modules.attention import SpatialTransformer, optimized_attention

from ..attention.attn import apply_probs, attention_probs
from ..attention.processor import AttnCall, kinds_of, needs_probs, splits_heads
from ..attention.videop2p import BRANCHES_KEY
from ._compat import attention_kwargs

PROCESSORS_KEY = "zsve_processors"
RECORDERS_KEY = "zsve_recorders"
PATCHES_KEY = "zsve_patches_replace"  # the UNet call's patches_replace (all slots), for the dispatchers
REPLACED_KEY = "zsve_replaced"  # {(slot, (block, number, index)): the patch that had replaced our dispatcher}
GUIDANCE_KEY = "zsve_guidance_pass"  # True inside another node's guidance pass (post-CFG model calls)
KINDS_KEY = "zsve_chunk_kinds"  # chunk kinds (0 cond, 1 uncond) as in the step's main pass
SCOPE_KEY = "zsve_attention"  # key of the pack's keyed wrappers
SLOTS = (("self", "attn1"), ("cross", "attn2"))
# Modules whose attention patches add a term to attention (read from their source: IPAdapter / InstantID's
# CrossAttentionPatch returns optimized_attention(q, k, v) + sum of weighted image attention terms).
KNOWN_ADDITIVE_MODULES = ("ipadapter", "instantid")
# Explicit probabilities of self-attention are formed one chunk of heads at a time, the chunk chosen so that its
# float32 scores take at most this many bytes (at least one head). Peak extra memory of an explicit call:
# about 2.5x this per chunk (the float32 scores, the probabilities in the compute dtype, a processor's new
# probabilities) plus the call's output; one head of one row set is the floor (`head_chunk`).
EXPLICIT_CHUNK_BYTES = 64 * 2**20
log = logging.getLogger(__name__)


def head_chunk(rows: int, heads: int, nq: int, nk: int, budget: int | None = None) -> int:
    """Heads per chunk of the explicit path: float32 scores [rows, chunk, nq, nk] within `budget` bytes
    (EXPLICIT_CHUNK_BYTES), at least one head."""
    budget = EXPLICIT_CHUNK_BYTES if budget is None else budget
    return max(1, min(heads, budget // max(1, rows * nq * nk * 4)))


@dataclass
class DispatchStats:
    """Counts of what the dispatchers did (benchmarks/overhead.py and the tests read them): attention calls
    on the optimized path, rows computed by optimized attention inside a controlled call, rows with explicit
    probabilities, calls answered at the output level (attend_output), calls with probabilities-free
    readers, and the largest explicit chunk (bytes of its float32 scores)."""

    plain_calls: int = 0
    optimized_rows: int = 0
    explicit_rows: int = 0
    explicit_calls: int = 0
    output_calls: int = 0
    reader_calls: int = 0
    max_chunk_bytes: int = 0

    def reset(self) -> None:
        for f in dataclasses.fields(self):
            setattr(self, f.name, 0)


STATS = DispatchStats()


def transformer_block_keys(model: comfy.model_patcher.ModelPatcher) -> list[tuple[str, int, int]]:
    """(block name, block number, depth index) of every transformer block of the UNet."""
    unet = model.get_model_object("diffusion_model")
    keys: list[tuple[str, int, int]] = []
    groups = [("input", list(unet.input_blocks)), ("middle", [unet.middle_block]), ("output", list(unet.output_blocks))]
    for name, blocks in groups:
        for number, block in enumerate(blocks):
            for layer in block:
                if isinstance(layer, SpatialTransformer):
                    for depth in range(len(layer.transformer_blocks)):
                        keys.append((name, number, depth))
    return keys


def layer_name(key) -> str:
    return "_".join(str(x) for x in key)


def is_ours(patch) -> bool:
    return bool(getattr(patch, "is_zsve_dispatcher", False))


def patch_name(patch) -> str:
    """A readable name of another pack's patch: module and qualified name of its function or class."""
    fn = patch if hasattr(patch, "__qualname__") else type(patch)
    module = (getattr(fn, "__module__", "") or "").replace("\\", "/").rsplit("/", 1)[-1]  # packs load by path
    return f"{module}.{getattr(fn, '__qualname__', repr(fn))}".lstrip(".")


def declared_additive(patch) -> bool:
    """A patch that says it adds a term to attention (`zsve_compose = "additive"`), or one of the packs whose
    patches are known to (KNOWN_ADDITIVE_MODULES)."""
    if getattr(patch, "zsve_compose", None) == "additive":
        return True
    module = (getattr(patch, "__module__", None) or getattr(type(patch), "__module__", "") or "").lower()
    return any(m in module for m in KNOWN_ADDITIVE_MODULES)


def _step_index(extra: dict, sigma: torch.Tensor) -> tuple[int | None, int | None]:
    ss = extra.get("sample_sigmas")
    if ss is None:
        return None, None
    hits = torch.isclose(ss.to(sigma.device, torch.float32), sigma.float(), rtol=1e-4, atol=1e-6).nonzero()
    return (int(hits[0]) if len(hits) else None), len(ss) - 1


# --- run / step state ----------------------------------------------------------------------------------
# One sampling run (OUTER_SAMPLE wrapper) and one model evaluation of the sampler (PREDICT_NOISE wrapper);
# the post-CFG marker flips the step into its guidance phase: every UNet call after it in the same
# evaluation is another node's guidance pass.


@dataclass
class _RunState:
    warned: set = field(default_factory=set)
    notes: list = field(default_factory=list)  # the warnings of this run, in order


@dataclass
class _StepState:
    guidance: bool = False
    kinds: dict = field(default_factory=dict)  # cond uuid -> chunk kind in the main pass


_RUN: contextvars.ContextVar = contextvars.ContextVar("zsve_run", default=None)
_STEP: contextvars.ContextVar = contextvars.ContextVar("zsve_step", default=None)
_FRAMES: contextvars.ContextVar = contextvars.ContextVar("zsve_foreign_frames", default=())
_WARNED_OUTSIDE_RUNS: set = set()


def _run_scope(executor, *args, **kwargs):
    """OUTER_SAMPLE wrapper: a fresh run state (warnings once per run); each processor on the model may refuse the
    company it is in before the first UNet call (`check_company`, attention/processor.py)."""
    guider = getattr(executor, "class_obj", None)
    options = getattr(guider, "model_options", None) or {}
    procs = list(options.get("transformer_options", {}).get(PROCESSORS_KEY, ()))
    for p in procs:
        check = getattr(p, "check_company", None)
        if check is not None:
            check(procs)
    token = _RUN.set(_RunState())
    try:
        return executor(*args, **kwargs)
    finally:
        _RUN.reset(token)


def _step_scope(executor, *args, **kwargs):
    """PREDICT_NOISE wrapper: one model evaluation of the sampler; starts in its main phase."""
    token = _STEP.set(_StepState())
    try:
        return executor(*args, **kwargs)
    finally:
        _STEP.reset(token)


def mark_guidance_pass(args):
    """Post-CFG function, kept first in the list: the main pass of this evaluation is done, every further
    UNet call in it is another node's guidance pass. Changes nothing."""
    step = _STEP.get()
    if step is not None:
        step.guidance = True
    return args["denoised"]


def begin_guidance_phase() -> None:
    """For guiders of the pack that call cfg_function themselves: the main pass of the step is done."""
    step = _STEP.get()
    if step is not None:
        step.guidance = True


def in_guidance_pass(to: dict | None = None) -> bool:
    if to is not None and GUIDANCE_KEY in to:
        return bool(to[GUIDANCE_KEY])
    step = _STEP.get()
    return bool(step is not None and step.guidance)


def chunk_kinds(to: dict) -> list[int]:
    """The kinds (0 cond, 1 uncond) of the chunks of a UNet call; in a guidance pass those of the same
    conditioning in the step's main pass (SAG evaluates the negative prompt as chunk kind 0)."""
    if to.get(KINDS_KEY) is not None:
        return list(to[KINDS_KEY])
    cou = list(to.get("cond_or_uncond") or [0])
    step = _STEP.get()
    uuids = to.get("uuids")
    if step is None or not step.guidance or not uuids or len(uuids) != len(cou):
        return cou
    return [step.kinds.get(u, c) for u, c in zip(uuids, cou)]


def current_run_notes() -> list[str]:
    run = _RUN.get()
    return list(run.notes) if run is not None else []


def note_once(key, text: str) -> None:
    """An information once per sampling run, in the log."""
    run = _RUN.get()
    seen = run.warned if run is not None else _WARNED_OUTSIDE_RUNS
    if key not in seen:
        seen.add(key)
        log.info("%s", text)


def warn_once(key, text: str) -> None:
    """A warning once per sampling run: in the log and as the running node's UI text."""
    run = _RUN.get()
    seen = run.warned if run is not None else _WARNED_OUTSIDE_RUNS
    if key in seen:
        return
    seen.add(key)
    if run is not None:
        run.notes.append(text)
    log.warning("%s", text)
    try:  # the text shown on the node that is running (the sampler), as ComfyUI's own nodes send it
        from comfy_execution.utils import get_executing_context
        from server import PromptServer

        ctx = get_executing_context()
        server = getattr(PromptServer, "instance", None)
        if ctx is not None and server is not None:
            server.send_progress_text(text, ctx.node_id)
    except Exception as e:  # headless without a server: the log has it
        log.debug("zsve: no UI text for the warning (%s)", e)


class _CallScope:
    """DIFFUSION_MODEL wrapper: per UNet call, gives the dispatchers what BasicTransformerBlock does not
    hand to patches (the call's patches_replace), puts dispatchers back where a later patch replaced them,
    marks guidance passes and the chunk kinds of the main pass."""

    def __init__(self, keys, model_sampling):
        self.keys = frozenset(keys)
        self.model_sampling = model_sampling

    def __deepcopy__(self, memo):
        return self

    def __call__(self, executor, *args, **kwargs):
        args = list(args)
        if len(args) > 5:
            to = args[5]
        else:
            to = kwargs.get("transformer_options")
        if to is None:
            return executor(*args, **kwargs)
        pr = to.get("patches_replace") or {}
        new = dict(to)
        new[PATCHES_KEY] = pr
        replaced: dict = {}
        new_pr = None
        for kind, slot in SLOTS:
            entries = pr.get(slot) or {}
            for key in self.keys:
                entry = entries.get(key)
                if is_ours(entry):
                    continue
                if new_pr is None:
                    new_pr = {s: dict(v) for s, v in pr.items()}
                new_pr.setdefault(slot, {})[key] = _Dispatcher(kind, key, self.model_sampling, reinstalled=True)
                if entry is not None:
                    replaced[(slot, key)] = entry
                    note_once(("replaced", slot, key, patch_name(entry)), (
                        f"Zero-Shot Video Edit: {patch_name(entry)} was set on {slot} of {layer_name(key)} after the "
                        "pack's nodes and took the place of the pack's attention dispatcher there; the dispatcher "
                        "is put back for each model call and calls it, so both apply."))
        if new_pr is not None:
            new["patches_replace"] = new_pr
            new[REPLACED_KEY] = replaced
        step = _STEP.get()
        cou = to.get("cond_or_uncond")
        uuids = to.get("uuids")
        new[GUIDANCE_KEY] = bool(step is not None and step.guidance)
        if step is not None and cou is not None and uuids and len(uuids) == len(cou):
            if step.guidance:
                new[KINDS_KEY] = [step.kinds.get(u, c) for u, c in zip(uuids, cou)]
            else:
                step.kinds.update(zip(uuids, cou))
        if len(args) > 5:
            args[5] = new
        else:
            kwargs["transformer_options"] = new
        return executor(*args, **kwargs)


# --- the dispatcher --------------------------------------------------------------------------------------


@dataclass
class _Frame:
    """A call of another pack's patch made by a dispatcher: if the patch calls a dispatcher of ours with the
    same query (it chains to what it replaced), that dispatcher answers with `ours` instead of running the
    processors a second time."""

    owner: object
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    ours: torch.Tensor | None
    consumed: bool = False

    def matches(self, q: torch.Tensor) -> bool:
        return q is self.q or (q.shape == self.q.shape and q.data_ptr() == self.q.data_ptr()
                               and q.stride() == self.q.stride())


def _reentered(q: torch.Tensor) -> _Frame | None:
    for fr in reversed(_FRAMES.get()):
        if fr.matches(q):
            return fr
    return None


def _branch_groups(extra: dict, batch: int) -> list[torch.Tensor] | None:
    """Video-P2P's two-branch calls: the rows of the source and of the target branch (rows of a chunk are
    [branch][frame]), so that another pack's patch sees each branch in ComfyUI's usual chunk x frames layout."""
    if int(extra.get(BRANCHES_KEY, 1) or 1) != 2:
        return None
    chunks = max(1, len(extra.get("cond_or_uncond") or [0]))
    per = batch // chunks
    if per % 2 or per * chunks != batch:
        return None
    f = per // 2
    return [torch.tensor([j * per + b * f + i for j in range(chunks) for i in range(f)]) for b in (0, 1)]


def _negligible(delta: torch.Tensor, ref: torch.Tensor) -> bool:
    tol = 1e-2 if delta.dtype in (torch.float16, torch.bfloat16) else 1e-3
    return float(delta.abs().max()) <= tol * float(ref.abs().max()) + 1e-6


class _Dispatcher:
    """A plain callable for one (attn kind, block); its state is immutable so deepcopy sharing is safe.

    previous: the patch that was on (block, number, index) when the dispatcher was installed;
    block_previous: the one on (block, number) then (used only when the call carries no PATCHES_KEY);
    reinstalled: put back by _CallScope for one call in place of the patch in REPLACED_KEY, which it calls."""

    is_zsve_dispatcher = True

    def __init__(self, kind: str, key, model_sampling, previous=None, block_previous=None, reinstalled=False):
        self.kind = kind
        self.slot = "attn1" if kind == "self" else "attn2"
        self.key = tuple(key)
        self.layer = layer_name(key)
        self.model_sampling = model_sampling
        self.previous = None if is_ours(previous) else previous
        self.block_previous = None if is_ours(block_previous) else block_previous
        self.reinstalled = reinstalled

    def __deepcopy__(self, memo):
        return self

    def _processors(self, extra: dict) -> list:
        procs = list(extra.get(PROCESSORS_KEY, ()))
        if not extra.get(GUIDANCE_KEY):  # recorders never record another node's guidance pass
            procs.extend(extra.get(RECORDERS_KEY, {}).values())
        return procs

    def foreign(self, extra: dict):
        """The other pack's patch for this call, as ComfyUI would have looked it up without the pack."""
        if self.reinstalled:
            got = (extra.get(REPLACED_KEY) or {}).get((self.slot, self.key))
            if got is not None:
                return got
        if self.previous is not None:
            return self.previous
        pr = extra.get(PATCHES_KEY)
        if pr is None:
            return self.block_previous
        got = (pr.get(self.slot) or {}).get(self.key[:2])
        return None if is_ours(got) else got

    def _fallback(self, q, k, v, extra):
        # transformer_options (the block's extra options) where accepted, so attention overrides still apply
        return optimized_attention(q, k, v, extra["n_heads"], attn_precision=extra.get("attn_precision"),
                                   **attention_kwargs(optimized_attention, extra))

    def make_call(self, q, extra) -> AttnCall:
        shape = extra.get("activations_shape") or extra.get("original_shape")
        h, w = int(shape[-2]), int(shape[-1])
        cou = chunk_kinds(extra)
        frames = q.shape[0] // max(1, len(cou))
        sigmas = extra.get("sigmas")
        sigma = sigmas[0] if sigmas is not None else torch.tensor(0.0)
        t = int(self.model_sampling.timestep(sigma.reshape(1).float()).item()) if sigmas is not None else -1
        step, total = _step_index(extra, sigma.reshape(()))
        window = extra.get("context_window")
        frame_index = list(window.index_list) if window is not None and hasattr(window, "index_list") else None
        return AttnCall(kind=self.kind, layer=self.layer, hw=(h, w), frames=frames, cond_or_uncond=cou,
                        sigma=float(sigma), timestep=t, heads=int(extra["n_heads"]), step_index=step,
                        total_steps=total, frame_index=frame_index, extra=extra,
                        guidance=bool(extra.get(GUIDANCE_KEY)))

    def __call__(self, q, k, v, extra_options):
        frame = _reentered(q)
        if frame is not None:  # another pack's patch that we are calling chains back to us
            frame.consumed = True
            if frame.owner is self:
                return frame.ours if frame.ours is not None else self._fallback(frame.q, frame.k, frame.v,
                                                                              extra_options)
            return self._compose(q, frame.k, frame.v, extra_options, frame.ours)
        procs = self._processors(extra_options)
        if not procs:
            STATS.plain_calls += 1
            return self._compose(q, k, v, extra_options, None)
        call = self.make_call(q, extra_options)
        call.q, call.k, call.v = q, k, v
        for p in procs:  # optional key/value stage (attention/processor.py): read or replace k/v
            kv = getattr(p, "process_kv", None)
            if kv is not None:
                new_kv = kv(call, k, v)
                if new_kv is not None:
                    k, v = new_kv
                    call.k, call.v = k, v
        active = [p for p in procs if p.active(call)]
        if not active:
            STATS.plain_calls += 1
            return self._compose(q, k, v, extra_options, None)
        readers = [p for p in active if not needs_probs(p, call)]
        for p in readers:  # recorders of q/k/v: no probabilities
            p(call, None)
        if readers:
            STATS.reader_calls += 1
        users = [p for p in active if needs_probs(p, call)]
        ours = self._controlled(call, users, q, k, v, extra_options) if users else None
        if ours is None:
            STATS.plain_calls += 1
        return self._compose(q, k, v, extra_options, ours)

    def _controlled(self, call: AttnCall, procs: list, q, k, v, extra) -> torch.Tensor | None:
        """The call's output when processors read or change its probabilities (None: nothing changed): the
        chunks of the kinds they ask for through `attend_output` or explicit probabilities, every other row
        through ComfyUI's optimized attention."""
        wanted = set().union(*(kinds_of(p, call) for p in procs))
        f = call.frames
        chunks = [j for j, c in enumerate(call.cond_or_uncond) if c in wanted]
        if not chunks:
            return None
        n_chunks = len(call.cond_or_uncond)
        if len(chunks) == n_chunks:
            idx, sub = None, call
        else:
            idx = torch.cat([torch.arange(j * f, (j + 1) * f) for j in chunks]).to(q.device)
            sub = dataclasses.replace(call, cond_or_uncond=[call.cond_or_uncond[j] for j in chunks],
                                      q=q[idx], k=k[idx], v=v[idx])
        out_sub = None
        if len(procs) == 1 and getattr(procs[0], "attend_output", None) is not None:
            out_sub = procs[0].attend_output(sub, lambda q_, k_, v_: self._fallback(q_, k_, v_, extra))
            if out_sub is not None:
                STATS.output_calls += 1
        if out_sub is None:
            out_sub = self._explicit(sub, procs)
            if out_sub is None:
                return None
        if idx is None:
            return out_sub
        rest = torch.ones(q.shape[0], dtype=torch.bool, device=q.device)
        rest[idx] = False
        out = q.new_empty((q.shape[0], q.shape[1], v.shape[-1]), dtype=out_sub.dtype)
        out[rest] = self._fallback(q[rest], k[rest], v[rest], extra).to(out.dtype)
        out[idx] = out_sub
        STATS.optimized_rows += int(rest.sum())
        return out

    def _explicit(self, call: AttnCall, procs: list) -> torch.Tensor | None:
        """probs @ v with the probabilities passed through `procs`, in the compute dtype; self-attention in
        chunks of heads when every processor acts per head. None if no processor changed them."""
        q, k, v = call.q, call.k, call.v
        rows, nq, nk, heads = q.shape[0], q.shape[1], k.shape[1], call.heads
        split = call.kind == "self" and all(splits_heads(p, call) for p in procs)
        hc = head_chunk(rows, heads, nq, nk) if split else heads
        STATS.explicit_calls += 1
        STATS.explicit_rows += rows
        STATS.max_chunk_bytes = max(STATS.max_chunk_bytes, rows * hc * nq * nk * 4)
        outs, changed = [], False
        for h0 in range(0, heads, hc):
            hr = (h0, min(heads, h0 + hc)) if split else None
            c = dataclasses.replace(call, head_range=hr) if split else call
            probs = attention_probs(q, k, heads, dtype=q.dtype, head_range=hr)
            for p in procs:
                new = p(c, probs)
                if new is not None:
                    probs = new
                    changed = True
            outs.append(apply_probs(probs, v, heads, hr))
            del probs
        if not changed:
            return None
        return outs[0] if len(outs) == 1 else torch.cat(outs, -1)

    def _compose(self, q, k, v, extra, ours):
        """The call's output from ours (None: no processor changed it) and the other pack's patch, if any."""
        foreign = self.foreign(extra)
        if foreign is None:
            if ours is not None:
                return ours
            return self._fallback(q, k, v, extra)
        groups = _branch_groups(extra, q.shape[0])
        if groups is None:
            return self._compose_one(foreign, q, k, v, extra, ours)
        out = None
        for idx in groups:
            idx = idx.to(q.device)
            o = self._compose_one(foreign, q[idx], k[idx], v[idx], extra, None if ours is None else ours[idx])
            if out is None:
                out = o.new_empty((q.shape[0],) + tuple(o.shape[1:]))
            out[idx] = o
        return out

    def _compose_one(self, foreign, q, k, v, extra, ours):
        frame = _Frame(self, q, k, v, ours)
        token = _FRAMES.set(_FRAMES.get() + (frame,))
        try:
            out = foreign(q, k, v, extra)
        finally:
            _FRAMES.reset(token)
        if ours is None or frame.consumed or out is v:
            # nothing of ours changed / the patch composed itself with ours / identity attention (PAG)
            return out
        attn = self._fallback(q, k, v, extra)
        delta = out - attn
        if not declared_additive(foreign) and not _negligible(delta, attn):
            name = patch_name(foreign)
            warn_once(("rule", name), (
                f"Zero-Shot Video Edit: {name} ({self.slot}, e.g. {self.layer}) changes attention in calls the pack "
                "edits too; they are combined as edited + (patch - plain attention), which is exact when the "
                "patch adds a term to attention (IPAdapter-style) and approximate when it changes the attention "
                "map itself."))
        return ours + delta.to(ours.dtype)


# --- installation ----------------------------------------------------------------------------------------


def ensure_dispatchers(model: comfy.model_patcher.ModelPatcher) -> None:
    """Install the dispatcher on every transformer block of `model` (a clone the caller owns), with the
    wrappers and the post-CFG marker that let it see and compose with other packs' patches."""
    ms = model.get_model_object("model_sampling")
    to = model.model_options.setdefault("transformer_options", {})
    replace = to.get("patches_replace", {})
    keys = transformer_block_keys(model)
    for kind, slot in SLOTS:
        existing = replace.get(slot, {})
        for key in keys:
            prev = existing.get(key)
            if is_ours(prev):
                continue
            model.set_model_patch_replace(_Dispatcher(kind, key, ms, prev, existing.get(key[:2])), slot, *key)
    wm = comfy.patcher_extension.WrappersMP
    for wrapper_type, fn in ((wm.DIFFUSION_MODEL, None), (wm.PREDICT_NOISE, _step_scope),
                             (wm.OUTER_SAMPLE, _run_scope)):
        if not model.get_wrappers(wrapper_type, SCOPE_KEY):
            model.add_wrapper_with_key(wrapper_type, SCOPE_KEY, fn if fn is not None else _CallScope(keys, ms))
    post = list(model.model_options.get("sampler_post_cfg_function", []))
    if mark_guidance_pass not in post:  # first, so that every post-CFG model call counts as a guidance pass
        model.model_options["sampler_post_cfg_function"] = [mark_guidance_pass] + post


def add_processor(model: comfy.model_patcher.ModelPatcher, processor) -> None:
    """Append a processor to the model's transformer options (the caller passes a clone)."""
    ensure_dispatchers(model)
    to = model.model_options.setdefault("transformer_options", {})
    to[PROCESSORS_KEY] = list(to.get(PROCESSORS_KEY, [])) + [processor]


def add_record_spec(model: comfy.model_patcher.ModelPatcher, name: str, spec) -> None:
    """Ask VideoDDIMInvert to record with `spec.new_recorder()` (a processor) during inversion."""
    ensure_dispatchers(model)
    to = model.model_options.setdefault("transformer_options", {})
    specs = dict(to.get("zsve_record_specs", {}))
    specs[name] = spec
    to["zsve_record_specs"] = specs
