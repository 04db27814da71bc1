"""ComfyUI nodes of the pack (V3 schema). Each module exports NODES; the algorithms are in ../attention."""

from __future__ import annotations

from . import blend, context, fatezero, infusion, inversion, prompts, reweight, toy, videop2p

NODE_MODULES = [prompts, inversion, context, blend, fatezero, toy, videop2p, infusion, reweight]


def all_nodes() -> list:
    out = []
    for mod in NODE_MODULES:
        out.extend(mod.NODES)
    return out
