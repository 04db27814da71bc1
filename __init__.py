"""Zero-Shot Video Edit: text-driven video editing for ComfyUI without training.

DDIM-invert the frames, record attention, then re-denoise with an edited prompt while fusing, injecting
and blending attention (FateZero, Video-P2P, InFusion, Blended Latent Diffusion under attention control).
"""

from __future__ import annotations

from comfy_api.latest import ComfyExtension, io

from . import attention, nodes  # noqa: F401
from .nodes import all_nodes

WEB_DIRECTORY = "./web"


class ZeroShotVideoEditExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return all_nodes()


async def comfy_entrypoint() -> ZeroShotVideoEditExtension:
    return ZeroShotVideoEditExtension()
