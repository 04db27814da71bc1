"""Video-P2P (Liu et al. 2023): shared null-text optimisation and two-branch editing with decoupled
guidance (own code, written from the paper and the notes in ../../shared/reference/algorithms.md §2).

Everything happens in ComfyUI's variance-exploding sigma space (see ddim.py): the reference's DDIM
`prev_step` from timestep t to the previous one is the Euler step `x_prev = x + eps * (sigma_prev - sigma)`
on the same sigmas, with eps = (x - denoised) / sigma.

Null-text optimisation (`optimize_null_text`, the reference's `null_optimization`). For every step i of
the edit schedule (0 = noisiest) starting at sigma_i with the latent x_i of the source branch:

    den_c  = D(x_i, sigma_i, source prompt)                           (no gradient)
    repeat up to `inner_steps` times, Adam(lr = 1e-2 * (1 - i / 100)) on the embedding u:
        den   = den_u(u) + g * (den_c - den_u(u))                      (classifier-free guidance, g = 7.5)
        loss  = mean((euler(x_i, den) - z_{i+1})^2) * alpha_bar(sigma_{i+1})
        stop early when loss < eps + i * 2e-5 (checked on the loss before the update, as the reference)
    keep u (one [1, 77, C] embedding shared by all frames); x_{i+1} = euler(x_i, den(u))

`z_{i+1}` is the inversion latent at the next (lower) sigma. The loss is measured on the VP latents
(x_vp = x * sqrt(alpha_bar)) so the early-stop threshold means what it means in the reference. The
embedding is warm-started from the previous step's result, as in the reference.

Gradients under ComfyUI: nodes run inside torch.inference_mode(), so the weights of models loaded there
are *inference tensors*, which autograd refuses to save for backward even inside
`inference_mode(False)` + `enable_grad()` ("Inference tensors cannot be saved for backward"), although
only the embedding needs a gradient and the weights are constants. `InferenceTensorsAsConstants` is a
torch function mode that hands every op a normal tensor that *aliases the storage* of an inference
tensor argument (no copy): autograd may save it, the weights are not duplicated and never receive
gradients. The only extra memory over a plain sampling run is what backward needs anyway: the
activations of one UNet evaluation of the F-frame unconditional batch (see the tests for a measurement).

Two-branch editing (`decoupled_step`, `VideoP2PController`): the source branch (source prompt,
optimised null text of the step, guidance g; in fast mode the conditional prediction only) and the
target branch (edit prompt, the ordinary empty prompt, guidance) are denoised in lockstep in one UNet
batch. Rows of a call are `chunk * 2F + branch * F + frame` (branch 0 = source, 1 = target); the
controller replaces the target's conditional cross-attention with Prompt-to-Prompt's word swap /
refinement / reweighting of the source's (p2p.cross_control), replaces the target's self-attention of
the layers with at most 32x32 queries (BranchPlan.self_max_queries) by the source's inside the self window, and keeps a running sum of both branches'
cross-attention of the blend words for Local Blend (masks.cross_attention_mask per branch, union):
after every step from `blend_start` on, x_tgt = x_src + M * (x_tgt - x_src).

This module does not import ComfyUI.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch.overrides import TorchFunctionMode

from . import p2p
from .masks import cross_attention_mask, phrases_of, union
from .store import FATEZERO_MAX_QUERIES

BRANCHES_KEY = "zsve_branches"  # transformer_options: rows of a chunk are [branch][frame]
# Video-P2P replaces the self-attention of maps with at most 32x32 queries (run_videop2p.py, AttentionControlEdit),
# FateZero's query-length rule for what it stores and fuses
P2P_SELF_MAX_QUERIES = FATEZERO_MAX_QUERIES


# --- schedules ---------------------------------------------------------------------------------------

def null_text_lr(i: int, base: float = 1e-2) -> float:
    """The reference's learning rate for step i (0 = noisiest): 1e-2 * (1 - i / 100)."""
    return base * (1.0 - i / 100.0)


def early_stop_threshold(i: int, epsilon: float = 1e-5, growth: float = 2e-5) -> float:
    """The reference's early-stop loss threshold for step i: epsilon + i * 2e-5."""
    return epsilon + i * growth


def euler_step(x: torch.Tensor, denoised: torch.Tensor, sigma: float, sigma_prev: float) -> torch.Tensor:
    """DDIM (eta 0) = Euler in VE space: x + eps * (sigma_prev - sigma), eps = (x - denoised) / sigma."""
    return x + (x - denoised) * ((sigma_prev - sigma) / sigma)


def denoised_for_next(x: torch.Tensor, x_next: torch.Tensor, sigma: float, sigma_next: float) -> torch.Tensor:
    """The denoised prediction that makes an Euler step from (x, sigma) land on x_next at sigma_next."""
    if sigma_next == 0:
        return x_next
    return x - (x_next - x) * (sigma / (sigma_next - sigma))


def vp_mse(x: torch.Tensor, target: torch.Tensor, sigma: float) -> torch.Tensor:
    """MSE of the VP latents (x * sqrt(alpha_bar)) of two VE latents at the same sigma."""
    return torch.mean((x.float() - target.float()) ** 2) / (1.0 + float(sigma) ** 2)


def cfg(uncond: torch.Tensor, cond: torch.Tensor, scale: float) -> torch.Tensor:
    return uncond + scale * (cond - uncond)


# --- autograd through inference-tensor weights -------------------------------------------------------

def normal_alias(t: torch.Tensor) -> torch.Tensor:
    """A normal (non-inference) tensor sharing `t`'s storage: no copy."""
    a = torch.empty(0, dtype=t.dtype, device=t.device)
    a.set_(t.untyped_storage(), t.storage_offset(), t.size(), t.stride())
    return a


class InferenceTensorsAsConstants(TorchFunctionMode):
    """Inside this mode (and inside `inference_mode(False)` + `enable_grad()`), inference tensors used by
    any torch op — model weights, buffers, cached tensors — are replaced by storage-sharing normal
    aliases, so autograd can differentiate w.r.t. other inputs (the null-text embedding) through a model
    whose weights were loaded under torch.inference_mode(). The weights are neither copied nor trained.
    `aliased` counts the distinct tensors aliased (for diagnostics)."""

    def __init__(self):
        super().__init__()
        self._cache: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    @property
    def aliased(self) -> int:
        return len(self._cache)

    def storages(self) -> set[int]:
        """data_ptr of the storages that were aliased (to tell weights from activations)."""
        return {a.untyped_storage().data_ptr() for _, a in self._cache.values()}

    def _fix(self, a):
        if isinstance(a, torch.Tensor):
            if not a.is_inference():
                return a
            hit = self._cache.get(id(a))
            if hit is None or hit[0] is not a:
                hit = (a, normal_alias(a))
                self._cache[id(a)] = hit
            return hit[1]
        if isinstance(a, (list, tuple)) and any(isinstance(x, torch.Tensor) for x in a):
            return type(a)(self._fix(x) for x in a)
        return a

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        args = tuple(self._fix(a) for a in args)
        kwargs = {k: self._fix(v) for k, v in kwargs.items()}
        return func(*args, **kwargs)


# --- null-text optimisation --------------------------------------------------------------------------

@dataclass(eq=False)
class NullText:
    """One unconditional embedding per edit step, shared by all frames (ZSVE_NULL_TEXT).

    `sigmas[i]` / `timesteps[i]`: the sigma and model timestep at which edit step i (0 = noisiest)
    evaluates the model; `embeddings[i]`: [1, T, C] float32 on the CPU. Read-only."""

    sigmas: list[float]
    timesteps: list[int]
    embeddings: list[torch.Tensor]
    guidance: float
    losses: list[float] = field(default_factory=list)  # final loss of each step (before its last update)
    iterations: list[int] = field(default_factory=list)
    info: dict = field(default_factory=dict)

    def __deepcopy__(self, memo):
        return self

    @property
    def steps(self) -> int:
        return len(self.embeddings)

    def index_of_timestep(self, timestep: int) -> int | None:
        try:
            return self.timesteps.index(int(timestep))
        except ValueError:
            return None

    def embedding_for(self, timestep: int) -> torch.Tensor:
        i = self.index_of_timestep(timestep)
        if i is None:
            raise KeyError(
                f"the null text has no embedding for timestep {timestep} (it was optimised for {self.steps} steps at "
                f"timesteps {self.timesteps[0]}..{self.timesteps[-1]}); sample the edit with the inversion's steps and "
                "the ddim_uniform scheduler"
            )
        return self.embeddings[i]

    def summary(self) -> str:
        if not self.losses:
            return f"null text: {self.steps} steps"
        return (f"null text: {self.steps} steps, guidance {self.guidance:g}, {sum(self.iterations)} inner iterations, "
                f"loss first step {self.losses[0]:.3g}, last step {self.losses[-1]:.3g}, max {max(self.losses):.3g}")


def optimize_null_text(
    den_cond: Callable[[torch.Tensor, float], torch.Tensor],
    den_uncond: Callable[[torch.Tensor, float, torch.Tensor], torch.Tensor],
    latents: Sequence[torch.Tensor],
    sigmas: Sequence[float],
    uncond: torch.Tensor,
    guidance: float = 7.5,
    inner_steps: int = 10,
    epsilon: float = 1e-5,
    lr: float = 1e-2,
    timesteps: Sequence[int] | None = None,
    device=None,
    on_step: Callable[[int, float, int], None] | None = None,
    interrupt: Callable[[], None] | None = None,
) -> NullText:
    """Video-P2P/NTI null-text optimisation along an inversion trajectory.

    `latents[k]` at `sigmas[k]` (ascending, latents[0] clean); `den_cond(x, sigma)` the denoised
    prediction with the source prompt, `den_uncond(x, sigma, emb)` with the embedding `emb` [1, T, C]
    (differentiable w.r.t. emb; the caller arranges the grad mode). Returns the NullText for the edit
    steps sigmas[N] -> ... -> sigmas[0]."""
    n = len(sigmas) - 1
    if n < 1 or len(latents) != n + 1:
        raise ValueError(f"need an inversion trajectory with at least one step ({len(latents)} latents, {len(sigmas)} sigmas)")
    sig = [float(s) for s in sigmas]
    device = latents[-1].device if device is None else device
    x = latents[n].to(device, torch.float32)
    emb = uncond.detach().to(device, torch.float32).clone()
    embs: list[torch.Tensor] = []
    losses: list[float] = []
    iters: list[int] = []
    for i in range(n):
        k = n - i
        s, s_prev = sig[k], sig[k - 1]
        target = latents[k - 1].to(device, torch.float32)
        with torch.no_grad():
            dc = den_cond(x, s).float()
        emb = emb.detach().clone().requires_grad_(True)
        opt = torch.optim.Adam([emb], lr=null_text_lr(i, lr))
        thr = early_stop_threshold(i, epsilon)
        loss_item = float("nan")
        done = 0
        for _ in range(inner_steps):
            if interrupt is not None:
                interrupt()
            du = den_uncond(x, s, emb).float()
            loss = vp_mse(euler_step(x, cfg(du, dc, guidance), s, s_prev), target, s_prev)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss_item = float(loss.detach())
            done += 1
            if loss_item < thr:
                break
        emb = emb.detach()
        embs.append(emb[:1].to("cpu", copy=True))
        losses.append(loss_item)
        iters.append(done)
        with torch.no_grad():
            du = den_uncond(x, s, emb).float()
            x = euler_step(x, cfg(du, dc, guidance), s, s_prev)
        if on_step is not None:
            on_step(i, loss_item, iters[-1])
    ts = list(timesteps) if timesteps is not None else [-1] * (n + 1)
    return NullText(sigmas=[sig[n - i] for i in range(n)], timesteps=[int(ts[n - i]) for i in range(n)],
                    embeddings=embs, guidance=float(guidance), losses=losses, iterations=iters,
                    info={"inner_steps": int(inner_steps), "epsilon": float(epsilon), "lr": float(lr),
                          "final_latent_error": float(vp_mse(x, latents[0].to(device, torch.float32), 0.0))})


def reconstruct(den_cond, den_uncond, z_T: torch.Tensor, sigmas_desc: Sequence[float], guidance: float,
                embeddings: Sequence[torch.Tensor] | torch.Tensor | None) -> torch.Tensor:
    """Sample the source branch with CFG from z_T over the descending sigmas (last one 0), the uncond
    embedding per step (a list), fixed (a tensor) — the measurement of what null text buys."""
    x = z_T.float()
    with torch.no_grad():
        for i in range(len(sigmas_desc) - 1):
            s, s_next = float(sigmas_desc[i]), float(sigmas_desc[i + 1])
            e = embeddings[i] if isinstance(embeddings, (list, tuple)) else embeddings
            x = euler_step(x, cfg(den_uncond(x, s, e).float(), den_cond(x, s).float(), guidance), s, s_next)
    return x


# --- two branches --------------------------------------------------------------------------------------

def decoupled_denoised(den_c: torch.Tensor, den_u: torch.Tensor, frames: int, guidance: float,
                       source_guidance: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Denoised predictions of the two branches from the cond/uncond predictions of the [2F] batch
    (source rows first). `source_guidance` None = fast mode (the source's conditional prediction)."""
    src_c, tgt_c = den_c[:frames], den_c[frames:]
    src_u, tgt_u = den_u[:frames], den_u[frames:]
    src = src_c if source_guidance is None else cfg(src_u, src_c, source_guidance)
    return src, cfg(tgt_u, tgt_c, guidance)


def local_blend(x_src: torch.Tensor, x_tgt: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """x_tgt outside the mask is replaced by the source branch: x_src + M * (x_tgt - x_src).
    mask [F, H, W] (broadcast over channels)."""
    m = mask.to(x_tgt.device, x_tgt.dtype).unsqueeze(1)
    return x_src + m * (x_tgt - x_src)


def blend_start_step(num_steps: int, start: float) -> int:
    """First step (0 = noisiest) after which Local Blend applies: the reference blends when its counter
    (steps done) exceeds int(start * N), i.e. after steps i >= int(start * N)."""
    return int(float(start) * num_steps)


@dataclass(eq=False)
class BranchPlan:
    """What the controller needs besides a FateZero FusionPlan (cross alphas, mapper, equalizer, self steps,
    timestep -> step map): the token positions of the blend words in each prompt."""

    # token positions of the blend words: a flat list (one phrase) or a list of phrases (lists of positions),
    # each phrase masked on its own and the masks united (attention/masks.py)
    blend_source: list | None = None
    blend_target: list | None = None
    blend_threshold: float = 0.3
    blend_start: float = 0.2
    mask_factor: int = 4
    # self-attention replacement only on layers whose query map has at most this many positions: the reference's
    # rule on the map at hand (Video-P2P run_videop2p.py, AttentionControlEdit: `attn.shape[2] <= 32 ** 2`), so that
    # SD1.5 at 512 px leaves out its 64x64 level and a 128-px clip (16x16 latent) has every level replaced
    self_max_queries: int = P2P_SELF_MAX_QUERIES
    record_min_factor: int = 2  # blend-word attention is recorded on these layers only (the mask uses ~1/4)

    def __deepcopy__(self, memo):
        return self

    @property
    def blends(self) -> bool:
        return bool(self.blend_source) or bool(self.blend_target)


class VideoP2PController:
    """Processor (processor.py protocol) for one two-branch sampling run: P2P control of the target
    branch by the source branch in the same call, and the running blend-word attention.

    Created fresh for every run; acts only on calls whose transformer options carry BRANCHES_KEY == 2."""

    SELF_ATTENTION_CONTROL = True  # attention/processor.py check_company

    def __init__(self, plan, branch: BranchPlan, frames: int, latent_hw: tuple[int, int]):
        self.plan = plan  # fatezero.FusionPlan (reused: alignment, windows, reweighting)
        self.branch = branch
        self.frames = int(frames)
        self.latent_hw = (int(latent_hw[0]), int(latent_hw[1]))
        # layer -> (hw, running sum [2, F, Nq, 1] of the head-mean attention of the blend words, and the number
        # of calls that recorded each frame [F]: under context windows a frame may be seen by several windows
        # in a step, so the mask is made from the per-frame mean)
        self.sums: dict[str, tuple[tuple[int, int], torch.Tensor, torch.Tensor]] = {}
        self.calls = 0

    def __deepcopy__(self, memo):
        return self

    def factor(self, hw) -> int:
        return max(1, round(self.latent_hw[0] / max(1, hw[0])))

    def step(self, call) -> int:
        i = self.plan.timestep_to_step.get(call.timestep)
        if i is None:
            raise ValueError(f"Video-P2P: the model was evaluated at timestep {call.timestep}, which is not a step of "
                             "this run's schedule")
        return i

    def _mine(self, call) -> bool:
        return int(call.extra.get(BRANCHES_KEY, 1)) == 2 and 0 in call.cond_or_uncond

    def active(self, call) -> bool:
        if not self._mine(call):
            return False
        local = self.frames if call.frame_index is None else len(call.frame_index)
        if call.frames != 2 * local:
            raise ValueError(f"Video-P2P: a call with {call.frames} rows per chunk, expected 2 x {local} frames")
        i = self.step(call)
        if call.kind == "cross":
            return self._records(call) or bool(self.plan.cross_alphas[i].any())
        a, b = self.plan.self_steps
        return a <= i < b and call.hw[0] * call.hw[1] <= self.branch.self_max_queries

    # dispatcher protocol extensions (attention/processor.py) --------------------------------------------
    def kinds(self, call) -> set[int]:
        return {0}

    def splits_heads(self, call) -> bool:
        return call.kind == "self"

    def attend_output(self, call, attend) -> torch.Tensor | None:
        """Self-attention replacement at the level of the output: the target rows take the source rows' map,
        so out = attend(q', k', v) with the target rows of q/k replaced by the source rows' (one optimized call,
        exactly the probs @ v of __call__)."""
        if call.kind != "self":
            return None
        self.step(call)
        f = call.frames // 2
        q, k = call.q.clone(), call.k.clone()
        for j, c in enumerate(call.cond_or_uncond):
            if c == 0:
                s0 = j * call.frames
                q[s0 + f:s0 + 2 * f] = q[s0:s0 + f]
                k[s0 + f:s0 + 2 * f] = k[s0:s0 + f]
        return attend(q, k, call.v)

    def __call__(self, call, probs: torch.Tensor) -> torch.Tensor | None:
        i = self.step(call)
        f = call.frames // 2  # the frames of this call (a context window's, or all)
        out = None
        for j, c in enumerate(call.cond_or_uncond):
            if c != 0:
                continue
            s0 = j * call.frames
            src, tgt = probs[s0:s0 + f], probs[s0 + f:s0 + 2 * f]
            new = None
            if call.kind == "cross":
                a = self.plan.cross_alphas[i]
                if a.any():
                    new = p2p.cross_control(src, tgt, a, self.plan.cross_mode, self.plan.mapper,
                                            self.plan.refine_alphas, self.plan.equalizer)
                if self._records(call) and not call.guidance:  # Local Blend reads the main pass only
                    self._record(call, src, tgt if new is None else new)
            else:
                new = p2p.self_fusion(tgt, src, None)
            if new is not None:
                if out is None:
                    out = probs.clone()
                out[s0 + f:s0 + 2 * f] = new
        return out

    def _records(self, call) -> bool:
        return self.branch.blends and self.factor(call.hw) >= self.branch.record_min_factor

    def _record(self, call, src: torch.Tensor, tgt: torch.Tensor) -> None:
        """Running sum of the head-mean maps summed over the tokens of each blend phrase of each branch:
        [2, F, Nq, G] (G = the larger number of phrases of the two branches; missing phrases are zero)."""
        groups = [phrases_of(i) if i else [] for i in (self.branch.blend_source, self.branch.blend_target)]
        n = max(1, *(len(g) for g in groups))

        def word(m, phrases):
            out = torch.zeros(m.shape[0], m.shape[2], n, device=m.device)
            mean = m.mean(1)
            for j, idx in enumerate(phrases):
                out[..., j] = mean[..., idx].sum(-1).float()
            return out

        cur = torch.stack([word(src, groups[0]), word(tgt, groups[1])])
        idx = torch.arange(self.frames) if call.frame_index is None else torch.as_tensor(list(call.frame_index))
        prev = self.sums.get(call.layer)
        if prev is None:
            prev = (tuple(call.hw), cur.new_zeros((2, self.frames) + tuple(cur.shape[2:])), torch.zeros(self.frames))
        _, total, count = prev
        total.index_add_(1, idx.to(total.device), cur)
        count.index_add_(0, idx, torch.ones(len(idx)))
        self.sums[call.layer] = (tuple(call.hw), total, count)

    def _mean(self, layer: str) -> torch.Tensor:
        """[2, F, Nq, 1]: the running sum of a layer divided by the number of calls that saw each frame."""
        _, total, count = self.sums[layer]
        return total / count.clamp(min=1).view(-1, 1, 1).to(total)

    def mask_layers(self) -> list[str]:
        if not self.sums:
            return []
        factors = sorted({self.factor(hw) for hw, _, _ in self.sums.values()})
        best = min(factors, key=lambda fa: (abs(math.log(fa / self.branch.mask_factor)), -fa))
        return [name for name, (hw, _, _) in self.sums.items() if self.factor(hw) == best]

    def mask(self, out_hw=None) -> torch.Tensor | None:
        """Local Blend mask [F, H, W] (0/1) from the running attention: union of the source branch's blend
        words and the target branch's blend words. None if nothing was recorded."""
        layers = self.mask_layers()
        if not layers:
            return None
        out_hw = self.latent_hw if out_hw is None else out_hw
        hws = [self.sums[name][0] for name in layers]
        masks = []
        for b, idx in ((0, self.branch.blend_source), (1, self.branch.blend_target)):
            if idx:
                maps = [self._mean(name)[b] for name in layers]
                columns = [[j] for j in range(len(phrases_of(idx)))]  # one recorded column per phrase
                masks.append(cross_attention_mask(maps, hws, columns, out_hw, threshold=self.branch.blend_threshold))
        return union(*masks) if masks else None
