"""Deterministic DDIM (eta = 0) inversion in ComfyUI's sigma space.

Prompt-to-Prompt / Tune-A-Video / FateZero invert with `next_step`: the UNet is evaluated on the
*current* latent with the *next* (noisier) timestep label, and the DDIM update is applied in reverse:

    x0_hat  = (x_t - sqrt(1 - a_t) * eps) / sqrt(a_t)
    x_next  = sqrt(a_next) * x0_hat + sqrt(1 - a_next) * eps,   eps = eps_theta(x_t, t_next)

ComfyUI samples in the variance-exploding parameterisation x = x_vp / sqrt(a) with
sigma = sqrt((1 - a) / a). In that space the update above is exactly

    x_next = x + eps * (sigma_next - sigma)

which is the mirror image of ComfyUI's Euler/DDIM step `x_prev = x + eps * (sigma_prev - sigma)`.
Inverting on the sigmas of the `ddim_uniform` scheduler, reversed, therefore makes KSamplerAdvanced
(add_noise disabled, ddim/euler, ddim_uniform, same steps) walk back over exactly the same sigmas and
evaluate the UNet at exactly the same timesteps as the inversion did.

Difference from the reference code (documented): P2P/FateZero/Video-P2P treat the clean latent as
sitting at alpha_bar[0] (set_alpha_to_one=False, sigma ~= 0.029 for SD1.5), while ComfyUI's samplers end
at sigma 0. We start the inversion at sigma 0 so that inversion and sampling are exact mirrors; the
first inversion step then evaluates the UNet at the first real timestep (t=1), as the reference does.

This module does not import ComfyUI.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from tqdm.auto import trange


def alpha_bar_from_sigma(sigma: torch.Tensor | float) -> torch.Tensor:
    sigma = torch.as_tensor(sigma, dtype=torch.float64)
    return 1.0 / (1.0 + sigma**2)


def ddim_inversion_step_closed_form(x_vp: torch.Tensor, eps: torch.Tensor, a_cur: float, a_next: float) -> torch.Tensor:
    """The reference `next_step` in the VP (diffusers) parameterisation."""
    x0 = (x_vp - (1.0 - a_cur) ** 0.5 * eps) / a_cur**0.5
    return a_next**0.5 * x0 + (1.0 - a_next) ** 0.5 * eps


def ddim_inversion_step(x: torch.Tensor, eps: torch.Tensor, sigma_cur: float, sigma_next: float) -> torch.Tensor:
    """The same step in ComfyUI's VE parameterisation (x = x_vp / sqrt(alpha_bar))."""
    return x + eps * (sigma_next - sigma_cur)


@torch.no_grad()
def sample_ddim_inversion(
    model,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    extra_args: dict | None = None,
    callback: Callable | None = None,
    disable: bool | None = None,
    trajectory: list | None = None,
    interrupt: Callable[[], None] | None = None,
    on_step: Callable[[int, float], None] | None = None,
):
    """A k-diffusion style sampler function (usable in `comfy.samplers.KSAMPLER`) that inverts.

    `sigmas` ascend (sigmas[0] is usually 0). `model(x, sigma * s_in, **extra_args)` returns the
    denoised (x0) prediction, as ComfyUI's model wrappers do for eps- and v-prediction models alike.
    The latent at every sigma is appended to `trajectory` (on the CPU) as (sigma, latent) pairs.
    """
    extra_args = {} if extra_args is None else extra_args
    s_in = x.new_ones([x.shape[0]])
    if trajectory is not None:
        trajectory.append((float(sigmas[0]), x.detach().to("cpu", copy=True)))
    for i in trange(len(sigmas) - 1, disable=disable, desc="DDIM inversion"):
        if interrupt is not None:
            interrupt()
        s_cur, s_next = sigmas[i], sigmas[i + 1]
        if on_step is not None:
            on_step(i, float(s_next))
        # The UNet sees the VP latent of the current point with the label of the next timestep.
        x_in = x * ((1.0 + s_next**2) / (1.0 + s_cur**2)) ** 0.5
        denoised = model(x_in, s_next * s_in, **extra_args)
        eps = (x_in - denoised) / s_next
        if callback is not None:
            callback({"x": x, "i": i, "sigma": s_cur, "sigma_hat": s_next, "denoised": denoised})
        x = ddim_inversion_step(x, eps, s_cur, s_next)
        if trajectory is not None:
            trajectory.append((float(s_next), x.detach().to("cpu", copy=True)))
    return x


@dataclass(eq=False)
class Inversion:
    """What VideoDDIMInvert produces besides z_T: the schedule and the whole latent trajectory.

    `latents[k]` is the latent at `sigmas[k]` in the model's internal latent space (after the latent
    format's process_in, i.e. the space samplers work in), on the CPU. `sigmas` ascend, `sigmas[0]` is
    the clean latent's sigma (0). `timesteps[k]` is the model's integer timestep for `sigmas[k]`.
    `records` holds what record specs captured during the run (attention stores, features), by name.

    Treat as read-only: ComfyUI's output cache hands the same object to every downstream run.
    """

    sigmas: torch.Tensor
    timesteps: list[int]
    latents: list[torch.Tensor]
    cfg: float = 1.0
    records: dict = field(default_factory=dict)
    info: dict = field(default_factory=dict)

    def __deepcopy__(self, memo):
        return self

    @property
    def steps(self) -> int:
        return len(self.sigmas) - 1

    @property
    def frames(self) -> int:
        return int(self.latents[0].shape[0])

    @property
    def latent_shape(self) -> tuple[int, ...]:
        return tuple(self.latents[0].shape)

    @property
    def z_T(self) -> torch.Tensor:
        return self.latents[-1]

    @property
    def nbytes(self) -> int:
        n = sum(t.numel() * t.element_size() for t in self.latents) + self.sigmas.numel() * self.sigmas.element_size()
        for r in self.records.values():  # what the records hold in RAM (a spilled attention store: its index)
            n += int(getattr(r, "ram_nbytes", getattr(r, "nbytes", 0)))
        return n

    def index_of_sigma(self, sigma: float, rtol: float = 1e-4, atol: float = 1e-6) -> int | None:
        s = torch.as_tensor(float(sigma), dtype=self.sigmas.dtype)
        hits = torch.isclose(self.sigmas, s, rtol=rtol, atol=atol).nonzero()
        return int(hits[0]) if len(hits) else None

    def latent_at_sigma(self, sigma: float) -> torch.Tensor:
        k = self.index_of_sigma(sigma)
        if k is None:
            raise KeyError(
                f"sigma {float(sigma):.5f} is not on this inversion's schedule "
                f"({self.steps} steps, sigmas {float(self.sigmas[1]):.4f}..{float(self.sigmas[-1]):.4f}); sample with the "
                "same steps and the ddim_uniform scheduler as the inversion"
            )
        return self.latents[k]

    def summary(self) -> str:
        return (
            f"DDIM inversion: {self.frames} frame(s), latent {list(self.latent_shape[1:])}, {self.steps} steps, "
            f"cfg {self.cfg:g}, trajectory {self.nbytes / 2**20:.2f} MiB on CPU"
        ) + "".join(f"; {r.summary()}" for r in self.records.values() if callable(getattr(r, "summary", None)))
