"""Models for the benchmarks, built through ComfyUI's own classes with random weights (no checkpoint download).

`SD15_UNET` is the full-size SD1.5 UNet config (benchmarks/overhead.py, benchmarks/gpu_check.py).

`make_sdxl_model` builds an SDXL-architecture MODEL: SDXL's exact layout (comfy.supported_models.SDXL: three
levels, no attention at full resolution, 2 / 10 transformer blocks at the coarser levels, 2 ResBlocks per level,
9 decoder blocks, 64-channel heads, linear transformer projections, the pooled-text + size vector `y`) at a chosen
base width. `model_channels=320, context_dim=2048` is SDXL itself (2.6 G parameters, ~10 GiB in fp32);
`SDXL_SMALL` keeps every layer and block of SDXL at a fifth of the width (64 base channels: heads of 64
channels, 1, 2 and 4 of them per level), which runs on a CPU in seconds per step at 512 px. The attention
layers, their names and counts, the decoder blocks and the defaults the pack derives from them
(attention/arch.py) are the same as SDXL's.

Imported after ComfyUI has booted (tests/zsve_boot.py).
"""

from __future__ import annotations

import torch

# comfy/model_detection.py: the unet config ComfyUI detects for an SD1.5 checkpoint (context_dim 768,
# model_channels 320): the full-size SD1.5 UNet of the benchmarks
SD15_UNET = {
    "use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True, "legacy": False,
    "adm_in_channels": None, "in_channels": 4, "model_channels": 320, "num_res_blocks": [2, 2, 2, 2],
    "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0], "channel_mult": [1, 2, 4, 4], "transformer_depth_middle": 1,
    "use_linear_in_transformer": False, "context_dim": 768, "num_heads": 8,
    "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0], "use_temporal_attention": False,
    "use_temporal_resblock": False,
}
SDXL_FULL = {"model_channels": 320, "context_dim": 2048, "pooled_dim": 1280}
SDXL_SMALL = {"model_channels": 64, "context_dim": 256, "pooled_dim": 256}


def sdxl_unet_config(model_channels: int = 64, context_dim: int = 256, pooled_dim: int = 256) -> dict:
    """ComfyUI's SDXL UNet config (comfy/model_detection.py's SDXL entry) at another base width / text width."""
    return {
        "use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True,
        "legacy": False, "num_classes": "sequential", "adm_in_channels": pooled_dim + 6 * 256, "in_channels": 4,
        "model_channels": int(model_channels), "num_res_blocks": [2, 2, 2],
        "transformer_depth": [0, 0, 2, 2, 10, 10], "channel_mult": [1, 2, 4], "transformer_depth_middle": 10,
        "use_linear_in_transformer": True, "context_dim": int(context_dim),
        "transformer_depth_output": [0, 0, 0, 2, 2, 2, 10, 10, 10], "use_temporal_attention": False,
        "use_temporal_resblock": False,
    }


def make_sdxl_model(model_channels: int = 64, context_dim: int = 256, pooled_dim: int = 256, seed: int = 0,
                    dtype=torch.float32, device="cpu"):
    """An SDXL-architecture MODEL (ModelPatcher over comfy.model_base.SDXL, eps prediction) with random weights.
    Its conditioning: a text embedding [B, 77, context_dim] with {"pooled_output": [B, pooled_dim]}
    (see `sdxl_conditioning`)."""
    import comfy.model_base
    import comfy.model_patcher
    import comfy.supported_models

    from zsve_harness import init_module_

    cfg = comfy.supported_models.SDXL(sdxl_unet_config(model_channels, context_dim, pooled_dim))
    cfg.set_inference_dtype(dtype, None)
    dev = torch.device(device)
    base = comfy.model_base.SDXL(cfg, model_type=comfy.model_base.ModelType.EPS, device=dev)
    init_module_(base.diffusion_model, seed)
    base.diffusion_model.eval()
    return comfy.model_patcher.ModelPatcher(base, load_device=dev, offload_device=torch.device("cpu"))


def sdxl_conditioning(model, seed: int = 0, tokens: int = 77) -> list:
    """A random CONDITIONING for `make_sdxl_model` (text embedding and pooled output of the model's widths)."""
    cfg = model.model.model_config.unet_config
    g = torch.Generator().manual_seed(seed)
    emb = torch.randn(1, tokens, int(cfg["context_dim"]), generator=g)
    pooled = torch.randn(1, int(cfg["adm_in_channels"]) - 6 * 256, generator=g)
    return [[emb, {"pooled_output": pooled}]]
