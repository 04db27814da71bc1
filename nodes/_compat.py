"""Compatibility with the ComfyUI versions the pack supports (0.3.64 ... 0.8.0 and newer).

One place, one mechanism per concept, and always feature detection (what a function accepts), never a
version number: forks and nightly builds carry their own versions.

- Context windows: `IndexListContextWindow(index_list, dim, total_frames)` takes the clip's frame count
  from 0.8 on (and divides by it, so it must be given); older versions take (index_list, dim) only.
- Attention: the attention functions accept `transformer_options` (0.3.6x and newer: through it
  `optimized_attention_override` applies, e.g. another pack's attention override); older ones take no
  extra keyword.
"""

from __future__ import annotations

import functools
import inspect

import comfy.context_windows as cw


def _accepts(fn, name: str) -> bool:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return name in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


_accepts_cached = functools.lru_cache(maxsize=256)(_accepts)


def accepts_keyword(fn, name: str) -> bool:
    """Whether `fn` accepts the keyword `name` (by name or through **kwargs); signatures are cached."""
    try:
        return _accepts_cached(fn, name)
    except TypeError:  # an unhashable callable
        return _accepts(fn, name)


# --- context windows --------------------------------------------------------------------------------

_WINDOW_TAKES_TOTAL_FRAMES = "total_frames" in inspect.signature(cw.IndexListContextWindow.__init__).parameters


def window_init_kwargs(total_frames: int) -> dict:
    """Extra keywords for `IndexListContextWindow.__init__` on this ComfyUI: {"total_frames": n} where the
    constructor takes the clip's frame count (0.8 and newer), else {}."""
    return {"total_frames": int(total_frames)} if _WINDOW_TAKES_TOTAL_FRAMES else {}


def index_list_window(index_list: list[int], dim: int, total_frames: int) -> cw.IndexListContextWindow:
    """A core context window over `index_list` of a clip of `total_frames` frames along `dim`."""
    return cw.IndexListContextWindow(list(index_list), dim=dim, **window_init_kwargs(total_frames))


# --- attention --------------------------------------------------------------------------------------

def attention_kwargs(attention_fn, transformer_options: dict | None) -> dict:
    """Keywords for calling one of ComfyUI's attention functions (`optimized_attention`, ...) from an attention
    replace patch: `transformer_options` (the patch's extra options) where the function accepts it, so that
    attention overrides set in the transformer options still apply."""
    if transformer_options is not None and accepts_keyword(attention_fn, "transformer_options"):
        return {"transformer_options": transformer_options}
    return {}
