"""Boot ComfyUI as a library on CPU for the toy scripts (train, quality, benchmark), as tests/conftest.py does.

Use: `from toy import boot; boot.boot()` before importing ComfyUI modules or toy.model. Scripts run as
`python -m toy.train` from the pack root.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

PACK_ROOT = Path(__file__).resolve().parents[1]


def find_comfyui() -> Path:
    env = os.environ.get("COMFYUI_PATH")
    cands = [Path(env)] if env else []
    cands += [PACK_ROOT.parent.parent, Path.home() / "comfy" / "ComfyUI"]
    for p in cands:
        if (p / "comfy" / "model_management.py").is_file() and (p / "execution.py").is_file():
            return p.resolve()
    raise SystemExit("ComfyUI not found: set COMFYUI_PATH=/path/to/ComfyUI")


_BOOTED = False


def boot(threads: int | None = None, load_nodes: bool = False):
    """Configure ComfyUI for CPU/fp32/PyTorch attention and import it. Returns the ComfyUI path."""
    global _BOOTED
    comfy_path = find_comfyui()
    if threads is not None:
        import torch

        torch.set_num_threads(threads)
    if _BOOTED:
        return comfy_path
    # `python -m toy.x` puts the pack root first on sys.path, where the pack's own `nodes/` package would
    # shadow ComfyUI's nodes.py: drop it (toy is already imported) and put ComfyUI first.
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != PACK_ROOT]
    sys.path.insert(0, str(comfy_path))
    import comfy.options

    comfy.options.args_parsing = False
    from comfy.cli_args import args

    args.cpu = True
    args.use_pytorch_cross_attention = True
    args.force_fp32 = True
    args.fp32_text_enc = True
    import comfy.model_management  # noqa: F401
    import comfy.utils
    import utils.extra_config  # noqa: F401  (ComfyUI's utils, before nodes)

    comfy.utils.PROGRESS_BAR_ENABLED = False
    if load_nodes:
        import asyncio

        import nodes

        asyncio.run(nodes.init_extra_nodes(init_custom_nodes=False, init_api_nodes=False))
    _BOOTED = True
    return comfy_path


def load_pack(name: str = "zsve"):
    """Import the whole pack as a package called `name` (as ComfyUI would, by path), e.g. to use
    nodes._comfy.run_inversion from a script. boot() first."""
    import importlib.util

    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, PACK_ROOT / "__init__.py",
                                                  submodule_search_locations=[str(PACK_ROOT)])
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod
