"""The toy SD1.5-architecture model, built through ComfyUI's own classes, saved as ONE safetensors file.

- UNet: comfy.supported_models.SD15(small unet_config) -> comfy.model_base.BaseModel (v or eps) ->
  comfy.model_patcher.ModelPatcher.
- Text encoder: comfy.sd.CLIP(ClipTarget(SD1Tokenizer, SD1ClipModel)) with a small clip_l config and the
  real SD1 tokenizer shipped with ComfyUI. It is random and FROZEN (never trained): the UNet learns to
  read its outputs through cross-attention.
- VAE: a TAESD-format autoencoder with hand-set weights, loaded by comfy.sd.VAE: the encoder is the exact
  8x8 average of the RGB pixels into latent channels 0-2 (channel 3 is zero), affinely scaled; the
  decoder is nearest-neighbour upsampling of the same. No training; blocky but exact.

File layout (`toy/weights/toy_sd15.safetensors`): keys `unet.*` (fp32, or fp16 when the config says
`"unet_storage": "fp16"`), `clip.*` (fp16; the frozen encoder was generated fp16-exact, so nothing is lost) with
the token embedding cut to the rows of the toy world's words (`clip_vocab.ids` lists them; every other row loads
as zeros: the UNet never saw those words); the metadata holds `zsve_toy_config` (json) and `zsve_toy_train`
(json, training record). The VAE is not stored: its weights are a closed form of `latent_gain`
(`vae_state_dict`); files from before this layout (full embedding, `vae.*` keys) load too.

Import only after ComfyUI has been configured (conftest / toy.boot / inside ComfyUI).
"""

from __future__ import annotations

import copy
import itertools
import json
from pathlib import Path

import comfy.model_base
import comfy.model_patcher
import comfy.sd
import comfy.sd1_clip
import comfy.supported_models
import comfy.supported_models_base
import comfy.taesd.taesd
import torch

WEIGHTS = Path(__file__).resolve().parent / "weights" / "toy_sd15.safetensors"

DEFAULT_CONFIG = {
    "unet": {
        "model_channels": 32,
        "in_channels": 4,
        "out_channels": 4,
        "channel_mult": [1, 2],
        "num_res_blocks": [1, 1],
        "transformer_depth": [1, 1],
        "transformer_depth_output": [1, 1, 1, 1],
        "transformer_depth_middle": 1,
        "context_dim": 64,
        "use_linear_in_transformer": False,
        "adm_in_channels": None,
        "use_temporal_attention": False,
        "image_size": 16,
        "use_checkpoint": False,
        "use_spatial_transformer": True,
        "legacy": False,
    },
    "num_heads": 4,
    # "v" (v-prediction) or "eps". Two eps runs sampled badly in the time available (see RESULTS.md).
    "prediction": "v",
    "clip": {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_attention_heads": 2,
        "num_hidden_layers": 2,
        "projection_dim": 64,
    },
    # VAE: latent = (8x8 mean of rgb in 0..1 - 0.5) * latent_gain in channels 0-2, 0 in channel 3.
    # The SD1.5 latent format then multiplies by 0.18215 before the UNet, so the UNet sees values in
    # about +-latent_gain*0.09. 24 gives the training latents a standard deviation of ~1, as the SD1.5
    # noise schedule expects (with 12, std ~0.5, samples kept visible noise: the eps error at the
    # highest sigmas is amplified by sigma_max ~14.6).
    "latent_gain": 24.0,
    "image_size": 128,
    "seed": 0,
}


# --- construction -------------------------------------------------------------------------------------


def init_weights_(module: torch.nn.Module, seed: int, std: float = 0.02, fp16_exact: bool = False) -> None:
    """ComfyUI allocates weights with torch.empty: give every parameter/buffer a defined value."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in itertools.chain(module.named_parameters(), module.named_buffers()):
            if not p.is_floating_point():
                continue
            leaf = name.rsplit(".", 1)[-1]
            if leaf == "bias" or "position_ids" in name:
                p.zero_()
            elif "norm" in name and leaf == "weight" and p.ndim == 1:
                p.fill_(1.0)
            elif p.ndim >= 2:
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=g) * (1.0 / fan_in) ** 0.5)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * std)
            if fp16_exact:
                p.copy_(p.half().float())


def _zero_out_layers(unet: torch.nn.Module) -> None:
    """SD-style: zero the last conv of every res block and the output projection of every transformer,
    and the final output conv, so the untrained UNet starts near identity-ish/zero prediction."""
    with torch.no_grad():
        for name, mod in unet.named_modules():
            if name.endswith("out_layers.3") or name.endswith("proj_out") or name == "out.2":
                for p in mod.parameters():
                    p.zero_()


def build_unet(config: dict | None = None, init_seed: int | None = None) -> comfy.model_patcher.ModelPatcher:
    config = config or DEFAULT_CONFIG
    cfg = comfy.supported_models.SD15(copy.deepcopy(config["unet"]))
    cfg.unet_config["num_heads"] = int(config["num_heads"])
    cfg.set_inference_dtype(torch.float32, None)
    cpu = torch.device("cpu")
    model_type = {"eps": comfy.model_base.ModelType.EPS, "v": comfy.model_base.ModelType.V_PREDICTION}[
        config.get("prediction", "eps")]
    base = comfy.model_base.BaseModel(cfg, model_type=model_type, device=cpu)
    if init_seed is not None:
        init_weights_(base.diffusion_model, init_seed)
        _zero_out_layers(base.diffusion_model)
    base.diffusion_model.eval()
    return comfy.model_patcher.ModelPatcher(base, load_device=cpu, offload_device=cpu)


def clip_target():
    return comfy.supported_models_base.ClipTarget(comfy.sd1_clip.SD1Tokenizer, comfy.sd1_clip.SD1ClipModel)


def build_clip(config: dict | None = None, init_seed: int | None = None) -> comfy.sd.CLIP:
    config = config or DEFAULT_CONFIG
    clip = comfy.sd.CLIP(clip_target(), model_options={"clip_l_model_config": dict(config["clip"])})
    if init_seed is not None:
        init_weights_(clip.cond_stage_model, init_seed, fp16_exact=True)
    return clip


def vae_state_dict(latent_gain: float) -> dict[str, torch.Tensor]:
    """Hand-set TAESD weights: encoder = exact 8x8 mean of rgb, decoder = nearest upsampling.

    TAESD.encode(x) = encoder(x*0.5+0.5) / vae_scale + vae_shift and TAESD.decode(z) =
    decoder((z - vae_shift) * vae_scale) * 2 - 1. The encoder's last conv writes e = 0.1 * (mean - 0.5)
    (so |e| <= 0.05 and the decoder's tanh Clamp is the identity to 1e-4), vae_scale = 0.1 / latent_gain.
    Every residual Block has zero convs, so Block(x) = relu(x) = x for the non-negative signals here.
    """
    small = 0.1
    ae = comfy.taesd.taesd.TAESD(latent_channels=4)
    sd = {k: torch.zeros_like(v) for k, v in ae.state_dict().items()}

    def ident3(w, n=3, scale=1.0):  # 3x3 conv, centre tap identity on the first n channels
        for c in range(n):
            w[c, c, 1, 1] = scale

    # encoder: 0 conv(3,64) | 1 Block | 2 conv s2 | 3-5 Blocks | 6 conv s2 | 7-9 | 10 conv s2 | 11-13 | 14 conv(64,4)
    ident3(sd["taesd_encoder.0.weight"])
    for i in (2, 6, 10):
        w = sd[f"taesd_encoder.{i}.weight"]  # stride 2, padding 1: taps 1,2 cover input rows 2i, 2i+1
        for c in range(3):
            w[c, c, 1:3, 1:3] = 0.25
    w = sd["taesd_encoder.14.weight"]
    ident3(w, scale=small)
    sd["taesd_encoder.14.bias"][:3] = -0.5 * small
    # decoder: 0 Clamp | 1 conv(4,64) | 2 ReLU | 3-5 Blocks | 6 Up | 7 conv | 8-10 | 11 Up | 12 conv | 13-15 | 16 Up |
    #          17 conv | 18 Block | 19 conv(64,3)
    ident3(sd["taesd_decoder.1.weight"], scale=1.0 / small)
    sd["taesd_decoder.1.bias"][:3] = 0.5
    for i in (7, 12, 17):
        ident3(sd[f"taesd_decoder.{i}.weight"])
    ident3(sd["taesd_decoder.19.weight"])
    sd["vae_scale"] = torch.tensor(small / latent_gain)
    sd["vae_shift"] = torch.tensor(0.0)
    return sd


def build_vae(config: dict | None = None, sd: dict | None = None) -> comfy.sd.VAE:
    config = config or DEFAULT_CONFIG
    if sd is None:
        sd = vae_state_dict(float(config["latent_gain"]))
    sd = {k: v.float() for k, v in sd.items()}
    return comfy.sd.VAE(sd=sd)


def pixels_to_latent(images: torch.Tensor, latent_gain: float) -> torch.Tensor:
    """What the toy VAE's encoder computes, in closed form: images [B,H,W,3] 0..1 -> latents [B,4,H/8,W/8]
    (ComfyUI latent format, before the model's 0.18215 scaling)."""
    x = images.movedim(-1, 1)
    m = torch.nn.functional.avg_pool2d(x, 8)
    z = torch.zeros(m.shape[0], 4, m.shape[2], m.shape[3], dtype=m.dtype)
    z[:, :3] = (m - 0.5) * latent_gain
    return z


# --- save / load --------------------------------------------------------------------------------------


def save(path: str | Path, model, clip, config: dict, train_info: dict | None = None,
         unet_state: dict | None = None, extra: dict | None = None) -> None:
    """Write the one-file checkpoint atomically (tmp + rename). `unet_state` overrides the model's weights
    (e.g. the EMA weights); `extra` holds additional tensors (e.g. `train.*` optimizer state)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    us = unet_state if unet_state is not None else model.model.diffusion_model.state_dict()
    # config["unet_storage"] == "fp16" stores the UNet in half precision (a wider UNet stays under the 20 MB
    # the committed file may take); load() computes in fp32 either way.
    dtype = torch.float16 if config.get("unet_storage") == "fp16" else torch.float32
    tensors = {"unet." + k: v.detach().to(dtype).contiguous().clone() for k, v in us.items()}
    ids = vocabulary_ids(clip)
    for k, v in clip.cond_stage_model.state_dict().items():
        if k.endswith(TOKEN_EMBEDDING):
            v = v[ids]  # only the rows of the words the toy world uses (most of the encoder's size otherwise)
        if v.is_floating_point():
            tensors["clip." + k] = v.detach().half().contiguous().clone()
        else:
            tensors["clip." + k] = v.detach().contiguous().clone()
    tensors["clip_vocab.ids"] = ids.to(torch.int32)
    for k, v in (extra or {}).items():
        tensors[k] = v.detach().contiguous().clone()
    meta = {"zsve_toy_config": json.dumps(config), "zsve_toy_train": json.dumps(train_info or {})}
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp), metadata=meta)
    tmp.chmod(0o644)
    tmp.replace(path)


TOKEN_EMBEDDING = "token_embedding.weight"


def vocabulary_ids(clip) -> torch.Tensor:
    """Sorted token ids of every caption the toy world can write (toy/scenes.py: each colour, shape and
    background, one or two objects), with the start/end/padding tokens: the rows of the token embedding
    the UNet has ever seen."""
    from . import scenes

    phrases = [f"a {c} {s}" for c in scenes.COLOR_NAMES for s in scenes.SHAPES]
    captions = [scenes.caption_of([p, phrases[0]], bg) for p in phrases for bg in scenes.all_backgrounds()]
    ids = set()
    for text in captions:
        for chunk in clip.tokenize(text)["l"]:
            ids.update(int(t[0]) for t in chunk)
    return torch.tensor(sorted(ids), dtype=torch.long)


def read(path: str | Path = WEIGHTS) -> tuple[dict, dict, dict]:
    """(tensors, config, train_info) of a toy checkpoint."""
    from safetensors import safe_open

    tensors = {}
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        for k in f.keys():
            tensors[k] = f.get_tensor(k)
    if "zsve_toy_config" not in meta:
        raise ValueError(f"{path} is not a toy checkpoint of this pack (no zsve_toy_config in its metadata).")
    return tensors, json.loads(meta["zsve_toy_config"]), json.loads(meta.get("zsve_toy_train", "{}"))


def _sub(tensors: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


def load(path: str | Path = WEIGHTS):
    """(MODEL, CLIP, VAE, info) from the one-file toy checkpoint, built through ComfyUI's classes."""
    tensors, config, train_info = read(path)
    model = build_unet(config)
    unet_sd = {k: v.float() for k, v in _sub(tensors, "unet.").items()}
    model.model.diffusion_model.load_state_dict(unet_sd, strict=True)
    clip = build_clip(config)
    clip_sd = {k: (v.float() if v.is_floating_point() else v) for k, v in _sub(tensors, "clip.").items()}
    if "clip_vocab.ids" in tensors:  # the embedding rows of the toy world's words; the other rows are zero
        for k, own in clip.cond_stage_model.state_dict().items():
            if k.endswith(TOKEN_EMBEDDING):
                full = torch.zeros_like(own, dtype=torch.float32)
                full[tensors["clip_vocab.ids"].long()] = clip_sd[k]
                clip_sd[k] = full
    clip.cond_stage_model.load_state_dict(clip_sd, strict=True)
    vae = build_vae(config, _sub(tensors, "vae.") or None)
    return model, clip, vae, {"config": config, "train": train_info}
