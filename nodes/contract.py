"""The edit contract (issue 16): one definition of what an edit run of this pack is, checked in one place.

An edit run is: this inversion's z_T, sampled over exactly the inversion's sigmas from z_T's sigma down to 0,
consecutively, with no noise added, by a deterministic first-order step (ComfyUI's `euler`, which is also what
its `ddim` sampler runs), with the prompts the inversion and the edit plan were made for.

Every edit path installs the same check:
- Attention Blend, InFusion Inject and Latent Blend With Inversion put an `EditContract` on the edit model as
  the keyed OUTER_SAMPLE wrapper `zsve_edit_contract` (`install_contract`); several edit nodes on one model
  share that one wrapper (one entry per node), so the run is checked once, before ComfyUI loads the model
  and long before the first UNet evaluation;
- the Video-P2P guider, which is the sampler's GUIDER, calls `check_edit_run` at the start of its `sample`;
- Null-Text Optimize checks its inputs (finite latents and conditionings) with the same functions.

A violation is refused (`ZSVEInputError`, a message naming the node, the input to change and the value to use)
or, where the result is still usable, warned once per run in the sampler node's UI text and in the log.

Differences from the issue's list, on purpose: a run that stops early on the schedule with its leftover noise
(KSamplerAdvanced end_at_step + return_with_leftover_noise) is accepted with a warning, and a second run that
starts where it stopped is accepted when its latent is that run's output (or the inversion's latent at that
sigma): the two stages together are exactly one edit run (tests/test_blend.py, test_contract.py). A run that
jumps to sigma 0 before the end (end_at_step with return_with_leftover_noise disabled) is refused.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import comfy.patcher_extension
import torch

from ..attention.ddim import Inversion
from ._comfy import ZSVEInputError, check_choice, check_finite, format_bytes, nonfinite_frames  # noqa: F401

CONTRACT_KEY = "zsve_edit_contract"
OUTER_SAMPLE = comfy.patcher_extension.WrappersMP.OUTER_SAMPLE
# The deterministic first-order steps that land exactly on the inversion trajectory in ComfyUI's sigma space:
# KSampler's "euler" and "ddim" (ComfyUI's ddim sampler is k-diffusion's sample_euler).
EXACT_SAMPLER_FUNCTIONS = ("sample_euler",)
SAMPLER_HINT = ("sample with KSamplerAdvanced (add_noise 'disable', sampler 'ddim' or 'euler', scheduler "
                "'ddim_uniform', steps {steps}, start_at_step 0, end_at_step 10000) or SamplerCustomAdvanced "
                "(Disable Noise, KSamplerSelect 'ddim'/'euler', BasicScheduler 'ddim_uniform' with {steps} steps, "
                "denoise 1), with latent_image = this inversion's z_T")
log = logging.getLogger(__name__)


def requested_steps(inv: Inversion) -> int:
    """The `steps` the inversion was asked for (ddim_uniform may give one more step when 1000 % steps != 0)."""
    return int(inv.info.get("steps_requested", inv.steps))


def ui_warning(node: str, text: str) -> None:
    """A warning for the person running the graph: the log, and the UI text of the node being executed (the
    sampler, for run-time checks), through ComfyUI's progress-text channel where a server is running."""
    log.warning("%s: %s", node, text)
    try:
        from comfy_execution.utils import get_executing_context
        from server import PromptServer

        ctx = get_executing_context()
        srv = getattr(PromptServer, "instance", None)
        if ctx is not None and srv is not None:
            srv.send_progress_text(f"{node}: {text}", ctx.node_id)
    except Exception as e:  # the UI channel is best effort; the log line above always happens
        log.debug("no UI text channel: %s", e)


# --- the conditioning -----------------------------------------------------------------------------------

def _entries(guider, key: str) -> list:
    conds = getattr(guider, "original_conds", None) or {}
    return list(conds.get(key) or [])


def cross_attn_of(entry: dict):
    """The text embedding [B, tokens, dim] of a converted cond entry (guider.original_conds[k][i])."""
    emb = entry.get("cross_attn")
    if emb is None:
        mc = entry.get("model_conds", {}).get("c_crossattn")
        emb = getattr(mc, "cond", None)
    return emb if torch.is_tensor(emb) else None


def check_conditioning(node: str, guider, positive_keys=("positive",), negative_keys=("negative",)) -> None:
    """Area / masked conditionings, non-finite embeddings and a negative prompt longer than the positive."""
    for key in (*positive_keys, *negative_keys):
        for e in _entries(guider, key):
            for opt in ("area", "mask"):
                if e.get(opt) is not None:
                    raise ZSVEInputError(
                        f"{node}: the '{key}' CONDITIONING is an {opt} conditioning (Conditioning Set "
                        f"{'Area' if opt == 'area' else 'Mask'}): the edit controls attention over the whole frame "
                        "and cannot follow it. Connect the plain CLIP Text Encode output; to edit a region, give "
                        "its mask to Latent Blend With Inversion ('mask', mask_source 'user mask' or 'union')."
                    )
            emb = cross_attn_of(e)
            if emb is not None and not bool(torch.isfinite(emb).all()):
                raise ZSVEInputError(f"{node}: the '{key}' CONDITIONING has NaN or infinite values; re-encode the "
                                     "prompt (CLIP Text Encode) with a working CLIP.")
    pos = [cross_attn_of(e) for k in positive_keys for e in _entries(guider, k)]
    neg = [cross_attn_of(e) for k in negative_keys for e in _entries(guider, k)]
    n_pos = max((int(t.shape[1]) for t in pos if t is not None), default=0)
    n_neg = max((int(t.shape[1]) for t in neg if t is not None), default=0)
    if n_pos and n_neg > n_pos:
        raise ZSVEInputError(
            f"{node}: the negative prompt encodes to {n_neg} tokens, the positive to {n_pos}: ComfyUI then repeats "
            f"the positive's tokens to {n_neg} in the batch it evaluates together, and the controlled cross-attention "
            "maps are split over the copies. Shorten the negative prompt to 75 tokens (one CLIP chunk) or less."
        )


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    a, b = a.detach().float().cpu(), b.detach().float().cpu()
    return tuple(a.shape[1:]) == tuple(b.shape[1:]) and torch.allclose(a[:1], b[:1], atol=1e-4, rtol=1e-4)


def conditioning_matches(entries: list, reference: torch.Tensor, pooled: torch.Tensor | None = None) -> bool:
    """Whether one of the cond entries carries the text embedding `reference` ([1, T, D], any device) and, where
    both sides have one, the pooled text embedding `pooled` ([1, D'], SDXL's clip_g pooled output)."""
    for e in entries:
        emb = cross_attn_of(e)
        if emb is None or not _close(emb, reference):
            continue
        own = e.get("pooled_output")
        if pooled is not None and torch.is_tensor(own) and not _close(own, pooled):
            continue
        return True
    return False


# --- the contract --------------------------------------------------------------------------------------

@dataclass(eq=False)
class ContractEntry:
    """One edit node's part of the contract: the node's name (for messages), the inversion it reads, and,
    where the node was given the prompt pair, the edit prompt's embedding the sampler must use."""

    node: str
    inversion: Inversion
    edit_embedding: torch.Tensor | None = None
    edit_text: str = ""
    edit_pooled: torch.Tensor | None = None  # SDXL: the edit prompt's pooled text embedding

    def __deepcopy__(self, memo):
        return self


class RunMemory:
    """The output of the last run that stopped early on the schedule, so that a second sampler may continue it."""

    def __init__(self):
        self.partial: dict[int, torch.Tensor] = {}  # inversion index k it stopped at -> its output (CPU)

    def __deepcopy__(self, memo):
        return self


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    a = a.detach().float().cpu()
    b = b.detach().float().cpu()
    if a.shape != b.shape:
        return False
    scale = max(1.0, float(b.abs().max())) if b.numel() else 1.0
    return bool(torch.allclose(a, b, rtol=1e-4, atol=1e-4 * scale))


def _latent_out(guider, x: torch.Tensor) -> torch.Tensor:
    """An internal-space latent (the inversion's trajectory) in the LATENT space the sampler nodes pass."""
    model = getattr(getattr(guider, "model_patcher", None), "model", None)
    fn = getattr(model, "process_latent_out", None)
    return fn(x) if fn is not None else x


def check_edit_run(entries, guider, noise, latent_image, sampler, sigmas, denoise_mask=None,
                   memory: RunMemory | None = None, positive_keys=("positive",),
                   negative_keys=("negative",), allow_partial: bool = True) -> list[tuple[str, str]]:
    """Check one sampling run against the contract of every entry; raise ZSVEInputError on a violation.

    noise / latent_image: the sampler's [F, C, h, w] (LATENT space, before process_latent_in); sigmas: the
    sampler's descending sigmas; denoise_mask: the latent's noise mask (or None); sampler: the SAMPLER object.
    Returns the warnings [(node, text)] to show (the caller shows them once)."""
    warnings: list[tuple[str, str]] = []
    if not entries:
        return warnings
    node = entries[0].node
    inv = entries[0].inversion
    steps = requested_steps(inv)
    hint = SAMPLER_HINT.format(steps=steps)

    # non-finite values and shapes first: every later message assumes a real latent
    f, _, h, w = inv.latent_shape
    if latent_image.ndim != 4 or latent_image.shape[0] != f or tuple(latent_image.shape[-2:]) != (h, w):
        raise ZSVEInputError(
            f"{node}: the sampler's latent is {list(latent_image.shape)} but the inversion's z_T is "
            f"{[f, inv.latent_shape[1], h, w]} ({f} frames of {w}x{h}): connect the z_T output of the Video DDIM "
            "Invert run that made this inversion to the sampler's latent_image."
        )
    check_finite(latent_image, node, "the sampler's latent", "Check the frames and VAE Encode that made it.")

    if denoise_mask is not None:
        raise ZSVEInputError(
            f"{node}: the sampler's LATENT carries a noise mask (Set Latent Noise Mask or an inpainting node): the "
            "sampler would mix the edit with the masked latent, off the inversion's trajectory. Remove the noise "
            "mask and give the mask to Latent Blend With Inversion instead (input 'mask', mask_source 'user mask' "
            "or 'union'), which keeps the outside exactly on the source."
        )
    if noise is not None and torch.count_nonzero(noise) > 0:
        raise ZSVEInputError(
            f"{node}: the sampler adds noise on top of z_T (the core KSampler always does; KSamplerAdvanced with "
            "add_noise 'enable'; SamplerCustomAdvanced with Random Noise), which throws the inversion away. Set "
            "KSamplerAdvanced's add_noise to 'disable', or use Disable Noise with SamplerCustomAdvanced; "
            + hint + "."
        )

    fn = getattr(sampler, "sampler_function", None)
    name = getattr(fn, "__name__", None) or type(sampler).__name__
    if name not in EXACT_SAMPLER_FUNCTIONS:
        shown = name[len("sample_"):] if name.startswith("sample_") else name
        raise ZSVEInputError(
            f"{node}: the sampler is '{shown}', but the edit must take the deterministic first-order DDIM step that "
            "mirrors the inversion (ancestral/SDE samplers add noise, higher-order ones evaluate the model between "
            "the inversion's steps). Set the sampler to 'ddim' or 'euler' (KSamplerAdvanced sampler_name, or "
            "KSamplerSelect for SamplerCustomAdvanced)."
        )
    extra = getattr(sampler, "extra_options", None) or {}
    if float(extra.get("s_churn", 0.0) or 0.0) > 0.0:
        raise ZSVEInputError(f"{node}: the euler sampler has s_churn {extra['s_churn']:g} (it adds noise): use "
                             "s_churn 0 (KSamplerSelect 'euler' or 'ddim').")

    for entry in entries:
        _check_sigmas(entry, sigmas, latent_image, guider, memory, warnings, allow_partial)

    check_conditioning(node, guider, positive_keys, negative_keys)
    for entry in entries:
        if entry.edit_embedding is not None:
            pos = [e for k in positive_keys for e in _entries(guider, k)]
            if pos and not conditioning_matches(pos, entry.edit_embedding, entry.edit_pooled):
                raise ZSVEInputError(
                    f"{entry.node}: the sampler's positive CONDITIONING is not the edit prompt of the prompt pair "
                    f"({entry.edit_text!r}): the attention control was planned for that prompt's words. Connect the "
                    "'edit' CONDITIONING output of Edit Prompts to the sampler's positive input."
                )
    return warnings


def exact_ddim_uniform_steps(steps: int, train_steps: int = 1000) -> bool:
    """Whether ComfyUI's ddim_uniform schedule (comfy/samplers.py `ddim_scheduler`: every (train_steps // steps)-th
    of the timesteps 1..train_steps-1) has exactly `steps` steps; for 12 it has 13 (10, 20, 25, 40, 50 are exact)."""
    stride = max(train_steps // steps, 1)
    return -(-(train_steps - 1) // stride) == steps


def _ddim_uniform_extra_step(inv_steps: int, steps: int, guider_only: bool) -> str:
    """The message for a BasicScheduler that kept the last `steps` of the `inv_steps` steps ddim_uniform gave."""
    lower = next((n for n in range(steps - 1, 0, -1) if exact_ddim_uniform_steps(n)), None)
    upper = next(n for n in range(steps + 1, 1001) if exact_ddim_uniform_steps(n))
    counts = f"{lower} or {upper}" if lower else str(upper)
    text = (f"ComfyUI's ddim_uniform schedule has {inv_steps} steps for steps={steps} (its 1000 timesteps do not "
            f"divide into {steps} evenly) and Video DDIM Invert inverted all {inv_steps}, but BasicScheduler keeps only "
            f"the last {steps}, so the edit would start one step below z_T: set 'steps' to {counts} (a count "
            "ddim_uniform keeps exact) in both Video DDIM Invert and BasicScheduler")
    if not guider_only:
        text += f", or sample with KSamplerAdvanced (steps {steps}: its ddim_uniform has the same {inv_steps} steps)"
    return text + "."


def _check_sigmas(entry: ContractEntry, sigmas, latent_image, guider, memory, warnings, allow_partial=True) -> None:
    inv, node = entry.inversion, entry.node
    steps = requested_steps(inv)
    hint = SAMPLER_HINT.format(steps=steps)
    sig = [float(s) for s in sigmas.detach().float().cpu().reshape(-1)]
    if len(sig) < 2 or sig[0] <= sig[-1]:
        raise ZSVEInputError(f"{node}: the sampler's sigmas do not descend ({len(sig)} values); " + hint + ".")
    idx = [inv.index_of_sigma(s) for s in sig]
    off = [i for i, k in enumerate(idx) if k is None]
    if off:
        i = off[0]
        raise ZSVEInputError(
            f"{node}: the sampler's sigma {sig[i]:.4f} (position {i} of its {len(sig) - 1} steps) is not on the "
            f"inversion's schedule (steps={steps}, scheduler ddim_uniform): other step counts, schedulers or denoise "
            f"< 1 put the steps elsewhere: set the sampler's steps to {steps} and its scheduler to ddim_uniform; "
            + hint + "."
        )
    for i in range(len(idx) - 1):
        if idx[i + 1] != idx[i] - 1:
            early_end = idx[i + 1] == 0 and i + 1 == len(idx) - 1
            what = (f"jumps from step {inv.steps - idx[i]} of {inv.steps} to the end (end_at_step before the end "
                    "with return_with_leftover_noise disabled)" if early_end else
                    f"steps from sigma {sig[i]:.4f} to {sig[i + 1]:.4f}, which are not neighbours on the inversion's "
                    f"schedule (a subset of its steps: the sampler has {len(sig) - 1} steps, the inversion {inv.steps})")
            raise ZSVEInputError(
                f"{node}: the sampler {what}: set the sampler's steps to {steps} and its scheduler to ddim_uniform, "
                "end_at_step 10000; " + hint + "."
            )
    k0, k_end = idx[0], idx[-1]
    if steps != inv.steps and len(sig) - 1 == steps and k0 == steps and k_end == 0:
        raise ZSVEInputError(f"{node}: " + _ddim_uniform_extra_step(inv.steps, steps, guider_only=not allow_partial))
    if not allow_partial and (k0 != inv.steps or k_end != 0):
        raise ZSVEInputError(
            f"{node}: the sampler runs steps {inv.steps - k0}..{inv.steps - k_end} of {inv.steps}; this edit samples "
            "both branches from z_T in one run: use start_at_step 0 and end_at_step 10000 (denoise 1); " + hint + "."
        )
    if k0 != inv.steps:
        own = _latent_out(guider, inv.latents[k0])
        prev = memory.partial.get(k0) if memory is not None else None
        if not (_same(latent_image, own) or (prev is not None and _same(latent_image, prev))):
            raise ZSVEInputError(
                f"{node}: the sampler starts at step {inv.steps - k0} of {inv.steps} (start_at_step > 0 or denoise < "
                "1) from a latent that is neither the inversion's latent at that sigma nor the output of a run of "
                "this model that stopped there: the edit would start off the trajectory. Start at step 0 from z_T "
                "(start_at_step 0, denoise 1), or continue the first stage's output (return_with_leftover_noise "
                "enable)."
            )
    elif not _same(latent_image, _latent_out(guider, inv.z_T)):
        warnings.append((node, "the sampler's latent is not this inversion's z_T (it differs from the z_T output of "
                               "the Video DDIM Invert run that made the inversion): the edit is planned for that z_T. "
                               "Connect that z_T to the sampler's latent_image."))
    if k_end != 0:
        warnings.append((node, f"the run stops at step {inv.steps - k_end} of {inv.steps} (end_at_step before the "
                               "end): its output still holds noise. Continue it with a second KSamplerAdvanced from "
                               f"start_at_step {inv.steps - k_end} (add_noise disable, the same steps)."))


def edit_rows(guider, rows: int) -> slice:
    """The rows of a sampler batch of `rows` latent frames that are the edit: the second half where the guider
    declares two branches (the Video-P2P Guider's [source branch; target branch] batch: class attribute
    `zsve_branches = 2`), else all of them. The one place this rule is read (the edit contract, Fresh Noise Start)."""
    if int(getattr(guider, "zsve_branches", 1)) == 2 and rows % 2 == 0:
        return slice(rows // 2, rows)
    return slice(0, rows)


class EditContract:
    """The keyed OUTER_SAMPLE wrapper that checks a sampling run of the edit model (one per model; entries per
    edit node). Immutable apart from the run memory; shared by model clones."""

    def __init__(self, entries: tuple[ContractEntry, ...], memory: RunMemory | None = None):
        self.entries = tuple(entries)
        self.memory = memory or RunMemory()

    def __deepcopy__(self, memo):
        return self

    def __call__(self, executor, noise, latent_image, sampler, sigmas, denoise_mask=None, *args, **kwargs):
        guider = getattr(executor, "class_obj", None)
        internal = getattr(sampler, "zsve_internal", False)  # the pack's own runs (null-text optimisation)
        if internal or sigmas.numel() < 2 or float(sigmas[0]) <= float(sigmas[-1]):
            return executor(noise, latent_image, sampler, sigmas, denoise_mask, *args, **kwargs)
        lat, nz, dm = latent_image, noise, denoise_mask
        t = edit_rows(guider, latent_image.shape[0])
        if t.start:  # the Video-P2P Guider's [source branch; target branch] latent: the target branch is the edit
            lat, nz = latent_image[t], (None if noise is None else noise[t])
            if dm is not None and dm.shape[0] == latent_image.shape[0]:
                dm = dm[t]
        warnings = check_edit_run(self.entries, guider, nz, lat, sampler, sigmas, dm, self.memory)
        seen = set()
        for node, text in warnings:
            if (node, text) not in seen:
                seen.add((node, text))
                ui_warning(node, text)
        out = executor(noise, latent_image, sampler, sigmas, denoise_mask, *args, **kwargs)
        inv = self.entries[0].inversion
        k_end = inv.index_of_sigma(float(sigmas[-1]))
        if k_end:
            self.memory.partial = {k_end: out[t].detach().to("cpu", copy=True)}
        return out


def install_contract(model, node: str, inversion: Inversion, edit_embedding: torch.Tensor | None = None,
                     edit_text: str = "", edit_pooled: torch.Tensor | None = None) -> None:
    """Put (or extend) the edit contract on `model` (a clone the caller owns): the run is checked against this
    node's inversion, and against the inversions of the edit nodes already on the model."""
    old = [w for w in model.get_wrappers(OUTER_SAMPLE, CONTRACT_KEY) if isinstance(w, EditContract)]
    entries = [e for w in old for e in w.entries if e.node != node]
    entries.append(ContractEntry(node, inversion, None if edit_embedding is None else edit_embedding.detach().cpu(),
                                 edit_text, None if edit_pooled is None else edit_pooled.detach().cpu()))
    model.remove_wrappers_with_key(OUTER_SAMPLE, CONTRACT_KEY)
    model.add_wrapper_with_key(OUTER_SAMPLE, CONTRACT_KEY, EditContract(tuple(entries)))
