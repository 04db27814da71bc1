"""The UNet's layout, read from its configuration, and the defaults of the methods that depend on it.

The four methods act on the attention layers and decoder blocks of an SD-style UNet (ComfyUI's
`comfy.ldm.modules.diffusionmodules.openaimodel.UNetModel`). SD1.x/2.x and SDXL share the blocks but not their
depths: SD1.5 has attention at every level but the coarsest (64x64 ... 16x16 at 512 px, one transformer block
each), SDXL none at its full-resolution level and 2 / 10 transformer blocks at the two coarser ones. Every default
that names a level, a channel count or a block is therefore derived here from the UNet config (the dict ComfyUI's
model config holds: `model.model.model_config.unet_config`), with rules that give the papers' SD1.5 values on
SD1.5:

- `store_min_factor`: FateZero records attention maps with at most 32x32 queries (`attention_store.py`,
  `attn.shape[-2] <= 32**2`), at 512 px every level but the finest. The rule of this pack, "skip the finest
  attention level", is that rule at the model's native resolution for both families: SD1.5 at 512 px records the
  factor-2 and coarser levels (32x32 and below), SDXL at 1024 px the factor-4 level (32x32).
- `temporal_min_channels`: FateZero's `least_sc_channel` 640 keeps SD1.5's finest attention level (320 channels)
  per-frame; the same rule gives 1280 on SDXL (its finest attention level has 640 channels).
- `infusion_blocks`: Plug-and-Play's SD1.5 choice, features of decoder block 4 and self-attention of decoder
  blocks 4-11, is "the second decoder block of the coarsest decoder level with attention, and every block from it
  to the last with attention": on SDXL decoder block 1 and blocks 1-5 (its blocks 6-8, the full-resolution level,
  have no attention).

Pure functions of a dict; this module does not import ComfyUI.
"""

from __future__ import annotations

from dataclasses import dataclass

SD15_UNET = {"model_channels": 320, "channel_mult": [1, 2, 4, 4], "num_res_blocks": [2, 2, 2, 2],
             "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0], "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
             "transformer_depth_middle": 1, "num_heads": 8, "num_head_channels": -1, "context_dim": 768}
SDXL_UNET = {"model_channels": 320, "channel_mult": [1, 2, 4], "num_res_blocks": [2, 2, 2],
             "transformer_depth": [0, 0, 2, 2, 10, 10], "transformer_depth_output": [0, 0, 0, 2, 2, 2, 10, 10, 10],
             "transformer_depth_middle": 10, "num_heads": -1, "num_head_channels": 64, "context_dim": 2048,
             "adm_in_channels": 2816}


@dataclass(frozen=True)
class AttentionLayer:
    """One transformer block: its name (the pack's layer key, e.g. 'input_4_1'), how many times smaller than the
    latent its query map is (`factor`), channels and heads."""

    name: str
    factor: int
    channels: int
    heads: int


@dataclass(frozen=True)
class DecoderBlock:
    """One decoder (output) block: index, factor below the latent, channels, transformer blocks (0: no attention)."""

    index: int
    factor: int
    channels: int
    depth: int


class ArchitectureError(ValueError):
    """The UNet config lacks what the layout needs."""


def _heads(cfg: dict, ch: int) -> int:
    nhc = int(cfg.get("num_head_channels", -1) or -1)
    if nhc != -1:
        return max(1, ch // nhc)
    return int(cfg.get("num_heads", 8))


def _per_level(v, n: int) -> list[int]:
    return [int(v)] * n if isinstance(v, int) else [int(x) for x in v]


def layout(cfg: dict) -> tuple[list[AttentionLayer], list[DecoderBlock]]:
    """(every transformer block, every decoder block) of a UNet config, in ComfyUI's UNetModel order."""
    try:
        mc = int(cfg["model_channels"])
        mult = [int(m) for m in cfg["channel_mult"]]
        nrb = _per_level(cfg["num_res_blocks"], len(mult))
        td = _per_level(cfg.get("transformer_depth", 1), sum(nrb))
        tdo = cfg.get("transformer_depth_output")
        tdo = [int(x) for x in tdo] if tdo is not None else None
    except (KeyError, TypeError) as e:
        raise ArchitectureError(f"not an SD-style UNet config ({e})") from None
    layers: list[AttentionLayer] = []
    decoder: list[DecoderBlock] = []
    block = 1  # input block 0 is the input convolution
    k = 0
    for level, m in enumerate(mult):
        ch = mc * m
        for _ in range(nrb[level]):
            depth = td[k] if k < len(td) else 0
            k += 1
            layers += [AttentionLayer(f"input_{block}_{d}", 2 ** level, ch, _heads(cfg, ch)) for d in range(depth)]
            block += 1
        if level != len(mult) - 1:
            block += 1  # downsample
    ch = mc * mult[-1]
    mid = cfg.get("transformer_depth_middle")
    mid = (td[-1] if td else 0) if mid is None else int(mid)
    layers += [AttentionLayer(f"middle_0_{d}", 2 ** (len(mult) - 1), ch, _heads(cfg, ch)) for d in range(max(0, mid))]
    if tdo is None:
        tdo = [d for lvl in range(len(mult)) for d in [td[sum(nrb[:lvl])] if nrb[lvl] else 0] * (nrb[lvl] + 1)]
    tdo = list(tdo)
    index = 0
    for level in reversed(range(len(mult))):
        ch = mc * mult[level]
        for _ in range(nrb[level] + 1):
            depth = tdo.pop() if tdo else 0
            layers += [AttentionLayer(f"output_{index}_{d}", 2 ** level, ch, _heads(cfg, ch)) for d in range(depth)]
            decoder.append(DecoderBlock(index, 2 ** level, ch, depth))
            index += 1
    return layers, decoder


def attention_factors(cfg: dict) -> list[int]:
    """The factors (latent size / query map size) of the levels that have attention, finest first."""
    return sorted({lay.factor for lay in layout(cfg)[0]})


def store_min_factor(cfg: dict, skip_finest: bool = True) -> int:
    """The Attention Store's `min_factor`: skip the finest attention level (SD1.5: 2, SDXL: 4), or record all (1)."""
    if not skip_finest:
        return 1
    factors = attention_factors(cfg)
    return 2 * factors[0] if factors else 2


def temporal_min_channels(cfg: dict) -> int:
    """FateZero's least_sc_channel for this UNet: the channels of the second-finest attention level, so that
    the finest stays per-frame (SD1.5: 640, SDXL: 1280); with one attention level, that level's channels."""
    layers = layout(cfg)[0]
    factors = sorted({lay.factor for lay in layers})
    if not factors:
        return 0
    level = factors[1] if len(factors) > 1 else factors[0]
    return min(lay.channels for lay in layers if lay.factor == level)


def infusion_blocks(cfg: dict) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(feature blocks, attention blocks): Plug-and-Play's SD1.5 (4,), (4..11) by its rule (module doc);
    SDXL: (1,), (1..5)."""
    decoder = layout(cfg)[1]
    with_attn = [b for b in decoder if b.depth > 0]
    if not with_attn:
        raise ArchitectureError("the UNet's decoder has no attention layers")
    coarsest = max(b.factor for b in with_attn)
    level = [b.index for b in decoder if b.factor == coarsest]
    feature = level[1] if len(level) > 1 else level[0]
    last = max(b.index for b in with_attn)
    return (feature,), tuple(range(feature, last + 1))


def format_blocks(blocks) -> str:
    """(4, 5, 6, 7) -> '4-7'; (1, 3) -> '1,3' (the form the block inputs accept)."""
    blocks = sorted(blocks)
    parts, start = [], None
    for i, b in enumerate(blocks):
        if start is None:
            start = b
        if i == len(blocks) - 1 or blocks[i + 1] != b + 1:
            parts.append(str(start) if start == b else f"{start}-{b}")
            start = None
    return ",".join(parts)


def family(cfg: dict) -> str:
    """A name for messages: 'SDXL-family', 'SD1.x/2.x-family', or '' for another layout."""
    factors = attention_factors(cfg)
    if cfg.get("adm_in_channels") and factors and factors[0] > 1:
        return "SDXL-family"
    if factors and factors[0] == 1:
        return "SD1.x/2.x-family"
    return ""
