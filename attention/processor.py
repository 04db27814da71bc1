"""The contract between the attention dispatcher (installed on the model by nodes/_attn_patch.py) and
the algorithms that read or change attention probabilities.

For every attention call of every transformer block the dispatcher builds an `AttnCall` and asks each
processor whether it is `active` for it. If none is, the ordinary fast attention (or another pack's replace
patch for the block) runs untouched. If some are, the cost is kept to what they need (issue 21,
docs/ARCHITECTURE.md "Cost of attention control"):

- a processor whose `needs_probs(call)` is False (a recorder of q/k/v) is called as `p(call, None)`;
- explicit probabilities are computed only for the chunks whose kinds (0 cond, 1 uncond) some processor
  lists in `kinds(call)` (default: every chunk); every other row gets ComfyUI's optimized attention. The
  processors then see a call restricted to those chunks (`cond_or_uncond` and q/k/v of those rows only);
- a single processor that can say what it does at the level of the attention output (`attend_output`, e.g.
  "the source's map replaces the edit's": out = attention(q_src, k_src, v)) is given an optimized
  attention function instead of probabilities, and no probability matrix is formed at all;
- otherwise the probabilities ([rows, heads, Nq, Nk], in the call's compute dtype) pass through the active
  processors in order; a processor returns None (it only read them) or new probabilities (a controller).
  For self-attention, when every processor `splits_heads(call)`, they are handed one chunk of heads at a
  time (`call.head_range`), so the float32 temporaries and the probabilities of a call are bounded by
  nodes/_attn_patch.py EXPLICIT_CHUNK_BYTES per chunk. The output is probs @ v.

How the dispatcher combines a changed call with another pack's patch is described in nodes/_attn_patch.py
and docs/ARCHITECTURE.md.

Guidance passes: nodes such as PAG and SAG evaluate the model a second time inside their post-CFG
function (a perturbed or blurred pass). Such calls carry `guidance=True`. Controllers act in them as in
the main pass (the pass is then a perturbation of the *edited* model); anything that records (stores,
mask collectors, running sums) must ignore them, or it would record the perturbed pass. In those passes
`cond_or_uncond` gives the chunk's kind as in the main pass of the step (SAG's pass of the negative prompt
reaches ComfyUI as chunk kind 0).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch


@dataclass
class AttnCall:
    kind: str  # "self" (attn1) or "cross" (attn2)
    layer: str  # e.g. "output_4_0": block name, block number, depth index
    hw: tuple[int, int]  # query feature map (height, width)
    frames: int  # latent batch size (frames) in this call
    cond_or_uncond: list[int]  # chunk kinds, rows are chunk * frames + frame
    sigma: float
    timestep: int  # the model's integer timestep for sigma: the key that matches inversion and edit steps
    heads: int
    step_index: int | None = None  # index of sigma in the run's sample_sigmas, if known
    total_steps: int | None = None
    frame_index: list[int] | None = None  # absolute frame indices (context windows), else 0..frames-1
    extra: dict = field(default_factory=dict, repr=False)
    # The call's projected queries/keys [B, N, heads*dim_head] (keys possibly lengthened by a temporal
    # attn1_patch to frames_kv*N). Read-only; recorders keep q/k instead of large probability maps.
    q: torch.Tensor | None = field(default=None, repr=False)
    k: torch.Tensor | None = field(default=None, repr=False)
    v: torch.Tensor | None = field(default=None, repr=False)  # the call's projected values (read-only)
    guidance: bool = False  # a pass of another node's guidance (PAG, SAG, ...): control, but do not record
    # explicit path only: the heads (h0, h1) of the probabilities handed to the processor (None: all heads)
    head_range: tuple[int, int] | None = None

    @property
    def tokens(self) -> int:
        return self.hw[0] * self.hw[1]

    @property
    def res(self) -> int:
        """The larger side of the query map: 64/32/16/8 for SD1.5 at 512x512."""
        return max(self.hw)

    def rows(self, which: int) -> list[int]:
        out: list[int] = []
        for i, c in enumerate(self.cond_or_uncond):
            if c == which:
                out.extend(range(i * self.frames, (i + 1) * self.frames))
        return out


class AttentionProcessor(Protocol):
    def active(self, call: AttnCall) -> bool: ...

    def __call__(self, call: AttnCall, probs: torch.Tensor) -> torch.Tensor | None: ...


# Optional, additive: a processor may also define
#
#     def process_kv(self, call: AttnCall, k: torch.Tensor, v: torch.Tensor) -> tuple[k, v] | None
#
# The dispatcher calls it for every attention call, before `active`, with the projected keys/values: a
# recorder reads them (return None), an injector returns replacements (InFusion / Plug-and-Play: source
# keys/values). Replaced keys/values are used by everything after it: the probabilities handed to active
# processors, or, when no processor is active, the fast attention / a foreign replace patch, so injecting
# keys/values alone never computes explicit probabilities.
#
#     def needs_probs(self, call: AttnCall) -> bool        # default True; False: called with probs=None
#     def kinds(self, call: AttnCall) -> set[int]          # chunk kinds it reads/changes; default: all
#     def splits_heads(self, call: AttnCall) -> bool       # acts on each head alone (call.head_range given)
#     def attend_output(self, call: AttnCall, attend) -> torch.Tensor | None
#
#     def check_company(self, processors: list) -> None   # once per sampling run, before the first UNet call
#     SELF_ATTENTION_CONTROL = True                       # class attribute: changes self-attention probabilities
#
# `check_company` is given every processor on the model (itself included) and raises to refuse a combination it
# cannot compute right (InFusion's key/value phase outside the concepts answers its calls at the output level and
# cannot share a self-attention call with another controller of its probabilities, `SELF_ATTENTION_CONTROL`).
#
# `attend_output` (used when it is the only active processor that needs probabilities): the output rows
# [rows of call, Nq, C] of the call, computed with `attend(q, k, v)` (ComfyUI's optimized attention on
# [B, N, C] tensors), exactly what probs @ v of its __call__ would give; None: use the explicit path.


def kinds_of(processor, call: AttnCall) -> set[int]:
    fn = getattr(processor, "kinds", None)
    return set(call.cond_or_uncond) if fn is None else set(fn(call))


def needs_probs(processor, call: AttnCall) -> bool:
    fn = getattr(processor, "needs_probs", None)
    return True if fn is None else bool(fn(call))


def splits_heads(processor, call: AttnCall) -> bool:
    fn = getattr(processor, "splits_heads", None)
    return False if fn is None else bool(fn(call))
