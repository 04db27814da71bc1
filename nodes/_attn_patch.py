"""The pack's one attention hook: a dispatcher installed as the attn1/attn2 replace patch of every
transformer block of a cloned model, which hands attention probabilities to the processors of
attention/processor.py (recorders, controllers, mask makers).

- Installed only through ModelPatcher's public replace-patch API on a clone; nothing is monkeypatched.
- Chains: a replace patch already on a block (another pack's, e.g. IPAdapter-style) is kept and called
  whenever no processor of ours changes that call's attention; when a processor only reads the
  probabilities, the foreign patch still computes the output.
- Processors are looked up per call in transformer_options: `zsve_processors` (a list, set by nodes on
  the model) and `zsve_recorders` (a dict, set per run by VideoDDIMInvert). Idempotent: installing twice
  does not stack dispatchers.
"""

from __future__ import annotations

import comfy.model_patcher
import torch
from comfy.ldm.modules.attention import SpatialTransformer, optimized_attention

from ..attention.attn import apply_probs, attention_probs
from ..attention.processor import AttnCall
from ._compat import attention_kwargs

PROCESSORS_KEY = "zsve_processors"
RECORDERS_KEY = "zsve_recorders"


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


def _step_index(extra: dict, sigma: torch.Tensor) -> tuple[int | None, int | None]:
    ss = extra.get("sample_sigmas")
    if ss is None:
        return None, None
    hits = torch.isclose(ss.to(sigma.device, torch.float32), sigma.float(), rtol=1e-4, atol=1e-6).nonzero()
    return (int(hits[0]) if len(hits) else None), len(ss) - 1


class _Dispatcher:
    """A plain callable for one (attn kind, block); its state is immutable so deepcopy sharing is safe."""

    is_zsve_dispatcher = True

    def __init__(self, kind: str, key, model_sampling, previous=None):
        self.kind = kind
        self.key = key
        self.layer = layer_name(key)
        self.model_sampling = model_sampling
        self.previous = previous

    def __deepcopy__(self, memo):
        return self

    def _processors(self, extra: dict) -> list:
        procs = list(extra.get(PROCESSORS_KEY, ()))
        procs.extend(extra.get(RECORDERS_KEY, {}).values())
        return procs

    def _fallback(self, q, k, v, extra):
        if self.previous is not None:
            return self.previous(q, k, v, extra)
        # transformer_options (the block's extra options) where accepted, so attention overrides still apply
        return optimized_attention(q, k, v, extra["n_heads"], attn_precision=extra.get("attn_precision"),
                                   **attention_kwargs(optimized_attention, extra))

    def make_call(self, q, extra) -> AttnCall:
        shape = extra.get("activations_shape") or extra.get("original_shape")
        h, w = int(shape[-2]), int(shape[-1])
        cou = list(extra.get("cond_or_uncond") or [0])
        frames = q.shape[0] // max(1, len(cou))
        sigmas = extra.get("sigmas")
        sigma = sigmas[0] if sigmas is not None else torch.tensor(0.0)
        t = int(self.model_sampling.timestep(sigma.reshape(1).float()).item()) if sigmas is not None else -1
        step, total = _step_index(extra, sigma.reshape(()))
        window = extra.get("context_window")
        frame_index = list(window.index_list) if window is not None and hasattr(window, "index_list") else None
        return AttnCall(kind=self.kind, layer=self.layer, hw=(h, w), frames=frames, cond_or_uncond=cou,
                        sigma=float(sigma), timestep=t, heads=int(extra["n_heads"]), step_index=step,
                        total_steps=total, frame_index=frame_index, extra=extra)

    def __call__(self, q, k, v, extra_options):
        procs = self._processors(extra_options)
        if not procs:
            return self._fallback(q, k, v, extra_options)
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
            return self._fallback(q, k, v, extra_options)
        probs = attention_probs(q, k, call.heads)
        changed = False
        for p in active:
            new = p(call, probs)
            if new is not None:
                probs = new
                changed = True
        if not changed and self.previous is not None:
            return self.previous(q, k, v, extra_options)
        return apply_probs(probs, v, call.heads)


def ensure_dispatchers(model: comfy.model_patcher.ModelPatcher) -> None:
    """Install the dispatcher on every transformer block of `model` (a clone the caller owns)."""
    ms = model.get_model_object("model_sampling")
    to = model.model_options.setdefault("transformer_options", {})
    replace = to.get("patches_replace", {})
    for kind, slot in (("self", "attn1"), ("cross", "attn2")):
        existing = replace.get(slot, {})
        for key in transformer_block_keys(model):
            prev = existing.get(key, existing.get(key[:2]))
            if getattr(prev, "is_zsve_dispatcher", False):
                continue
            model.set_model_patch_replace(_Dispatcher(kind, key, ms, prev), slot, key[0], key[1], key[2])


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
