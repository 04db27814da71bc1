"""Test/demo harness: tiny SD1.5-architecture models built through ComfyUI's own classes, and a runner
for API-format prompts through ComfyUI's real executor.

Imported after ComfyUI has been configured for CPU (tests/conftest.py or scripts/boot.py).
"""

from __future__ import annotations

import asyncio
import inspect
import uuid

import comfy.model_base
import comfy.model_management
import comfy.model_patcher
import comfy.sd
import comfy.sd1_clip
import comfy.supported_models
import comfy.supported_models_base
import execution
import nodes
import torch

TINY_UNET = {
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
    "image_size": 32,
    "use_spatial_transformer": True,
    "legacy": False,
}
TINY_CLIP = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_attention_heads": 2,
    "num_hidden_layers": 2,
    "projection_dim": 64,
}
TINY_VAE_DDCONFIG = {
    "double_z": True,
    "z_channels": 4,
    "resolution": 256,
    "in_channels": 3,
    "out_ch": 3,
    "ch": 32,
    "ch_mult": [1, 1, 1, 1],
    "num_res_blocks": 1,
    "attn_resolutions": [],
    "dropout": 0.0,
}


def init_module_(module: torch.nn.Module, seed: int, std: float = 0.02) -> torch.nn.Module:
    """ComfyUI allocates weights with torch.empty: give every parameter/buffer a defined value (the toy
    model's initialiser, toy/model.py init_weights_)."""
    from zsve.toy.model import init_weights_

    init_weights_(module, seed, std)
    return module


def make_tiny_model(seed: int = 0, prediction: str = "eps", unet: dict | None = None, heads: int | None = 2,
                    zsnr: bool = False):
    """A tiny SD1.5-architecture MODEL: comfy.supported_models.SD15 -> BaseModel -> ModelPatcher. prediction "v"
    with zsnr=True: an SD2.x-style v-prediction model with the zero-terminal-SNR schedule."""
    cfg = comfy.supported_models.SD15(dict(TINY_UNET, **(unet or {})))
    if heads is not None:
        cfg.unet_config["num_heads"] = heads
    cfg.set_inference_dtype(torch.float32, None)
    if zsnr:
        cfg.sampling_settings = dict(cfg.sampling_settings, zsnr=True)
    model_type = {"eps": comfy.model_base.ModelType.EPS, "v": comfy.model_base.ModelType.V_PREDICTION}[prediction]
    base = comfy.model_base.BaseModel(cfg, model_type=model_type, device=torch.device("cpu"))
    init_module_(base.diffusion_model, seed)
    # Output convolutions are zero-initialised in SD: keep them small but non-zero so the model acts.
    base.diffusion_model.eval()
    return comfy.model_patcher.ModelPatcher(base, load_device=torch.device("cpu"), offload_device=torch.device("cpu"))


# A tiny SDXL-architecture UNet: SDXL's layout (3 levels, no attention at the full-resolution level, deeper
# transformer stacks at the coarser levels, 2 ResBlocks per level -> 9 decoder blocks, linear transformer
# projections, the pooled-text + size vector `y`), at toy widths. context_dim = clip_l + clip_g hidden sizes;
# adm_in_channels = clip_g projection + 6 x 256 (SDXL's size/crop embeddings, comfy.model_base.SDXL.encode_adm).
TINY_SDXL_CLIP_L = {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2, "num_hidden_layers": 3,
                    "projection_dim": 32}
TINY_SDXL_CLIP_G = {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2, "num_hidden_layers": 3,
                    "projection_dim": 32}
TINY_SDXL_UNET = {
    "model_channels": 32,
    "in_channels": 4,
    "out_channels": 4,
    "channel_mult": [1, 2, 4],
    "num_res_blocks": [2, 2, 2],
    "transformer_depth": [0, 0, 1, 1, 2, 2],
    "transformer_depth_output": [0, 0, 0, 1, 1, 1, 2, 2, 2],
    "transformer_depth_middle": 2,
    "context_dim": TINY_SDXL_CLIP_L["hidden_size"] + TINY_SDXL_CLIP_G["hidden_size"],
    "use_linear_in_transformer": True,
    "num_classes": "sequential",
    "adm_in_channels": TINY_SDXL_CLIP_G["projection_dim"] + 6 * 256,
    "use_temporal_attention": False,
    "image_size": 32,
    "use_spatial_transformer": True,
    "legacy": False,
}


def make_tiny_sdxl_model(seed: int = 0, prediction: str = "eps", unet: dict | None = None, heads: int = 2,
                         zsnr: bool = False):
    """A tiny SDXL-architecture MODEL: comfy.supported_models.SDXL -> comfy.model_base.SDXL -> ModelPatcher.
    `prediction`: "eps", "v" (v-prediction; with zsnr=True zero-terminal-SNR), "edm" (Playground 2.5 style
    EDM sampling) or "v_edm"."""
    cfg = comfy.supported_models.SDXL(dict(TINY_SDXL_UNET, **(unet or {})))
    cfg.unet_config["num_heads"] = heads
    cfg.unet_config["num_head_channels"] = -1
    cfg.set_inference_dtype(torch.float32, None)
    mt = comfy.model_base.ModelType
    model_type = {"eps": mt.EPS, "v": mt.V_PREDICTION, "edm": mt.EDM, "v_edm": mt.V_PREDICTION_EDM}[prediction]
    if prediction in ("edm", "v_edm"):
        cfg.sampling_settings = dict(cfg.sampling_settings, sigma_data=0.5, sigma_max=80.0, sigma_min=0.002)
    if zsnr:
        cfg.sampling_settings = dict(cfg.sampling_settings, zsnr=True)
    base = comfy.model_base.SDXL(cfg, model_type=model_type, device=torch.device("cpu"))
    init_module_(base.diffusion_model, seed)
    base.diffusion_model.eval()
    return comfy.model_patcher.ModelPatcher(base, load_device=torch.device("cpu"), offload_device=torch.device("cpu"))


def make_tiny_sdxl_clip(seed: int = 0):
    """A tiny SDXL CLIP (clip_l + clip_g with the real tokenizers) through comfy.sdxl_clip / comfy.sd.CLIP: its
    conditioning carries the clip_g pooled output, as CLIP Text Encode makes it for SDXL."""
    import comfy.sdxl_clip

    target = comfy.supported_models_base.ClipTarget(comfy.sdxl_clip.SDXLTokenizer, comfy.sdxl_clip.SDXLClipModel)
    clip = comfy.sd.CLIP(target, model_options={"clip_l_model_config": dict(TINY_SDXL_CLIP_L),
                                                "clip_g_model_config": dict(TINY_SDXL_CLIP_G)})
    init_module_(clip.cond_stage_model, seed + 1)
    return clip


def make_tiny_clip(seed: int = 0):
    """A tiny comfy.sd.CLIP with the real SD1 tokenizer that ships with ComfyUI."""
    target = comfy.supported_models_base.ClipTarget(comfy.sd1_clip.SD1Tokenizer, comfy.sd1_clip.SD1ClipModel)
    clip = comfy.sd.CLIP(target, model_options={"clip_l_model_config": dict(TINY_CLIP)})
    init_module_(clip.cond_stage_model, seed + 1)
    return clip


def make_tiny_vae(seed: int = 0):
    """A tiny AutoencoderKL (8x downsampling, 4 latent channels) through comfy.sd.VAE."""
    from comfy.ldm.models.autoencoder import AutoencoderKL

    torch.manual_seed(seed)
    ae = AutoencoderKL(ddconfig=dict(TINY_VAE_DDCONFIG), embed_dim=4)
    init_module_(ae, seed + 2)
    sd = ae.state_dict()
    return comfy.sd.VAE(sd=sd, config={"params": {"embed_dim": 4, "ddconfig": dict(TINY_VAE_DDCONFIG)}})


def encode_text(clip, text: str):
    """CONDITIONING for a text, as CLIPTextEncode makes it."""
    tokens = clip.tokenize(text)
    return clip.encode_from_tokens_scheduled(tokens)


# --- graph execution -------------------------------------------------------------------------------

OBJECTS: dict[str, object] = {}
CAPTURED: dict[str, object] = {}


class _AnyType(str):
    def __ne__(self, other):  # matches every socket type
        return False


ANY = _AnyType("*")


class ZSVETestProvide:
    """Test-only node: returns a Python object registered in OBJECTS (a tiny MODEL, CLIP, VAE, ...)."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"key": ("STRING", {"default": ""})}}

    RETURN_TYPES = (ANY,)
    FUNCTION = "run"
    CATEGORY = "testing"

    @classmethod
    def IS_CHANGED(cls, key):
        return str(id(OBJECTS.get(key)))

    def run(self, key):
        return (OBJECTS[key],)


class ZSVETestCapture:
    """Test-only output node: stores whatever it receives in CAPTURED[key]."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"value": (ANY, {}), "key": ("STRING", {"default": ""})}}

    RETURN_TYPES = ()
    FUNCTION = "run"
    OUTPUT_NODE = True
    CATEGORY = "testing"

    def run(self, value, key):
        CAPTURED[key] = value
        return {}


def register_test_nodes():
    nodes.NODE_CLASS_MAPPINGS.setdefault("ZSVETestProvide", ZSVETestProvide)
    nodes.NODE_CLASS_MAPPINGS.setdefault("ZSVETestCapture", ZSVETestCapture)


class _ServerStub:
    def __init__(self):
        self.client_id = None
        self.last_node_id = None
        self.last_prompt_id = None
        self.sockets_metadata = {}  # read by the progress handler when a preview image is sent
        self.messages = []

    def send_sync(self, event, data, sid=None):
        self.messages.append((event, data))


class GraphError(RuntimeError):
    def __init__(self, message, details=None):
        super().__init__(message)
        self.details = details


_EXECUTOR = None


def executor_kwargs() -> dict:
    """PromptExecutor's keywords for ComfyUI's classic cache on this ComfyUI (feature-detected): newer versions
    (0.8 on) take `cache_args` and read its "ram" (and, newer still, "ram_inactive") entries on every run, as
    main.py passes them ({"lru": 0, "ram": 0} for the classic cache); older ones take `cache_size`."""
    kw = {"cache_type": execution.CacheType.CLASSIC}
    if "cache_args" in inspect.signature(execution.PromptExecutor.__init__).parameters:
        kw["cache_args"] = {"lru": 0, "ram": 0.0, "ram_inactive": 0.0}
    return kw


def get_executor(fresh: bool = False):
    """One PromptExecutor with ComfyUI's classic cache, shared so that re-runs hit the cache."""
    global _EXECUTOR
    if _EXECUTOR is None or fresh:
        _EXECUTOR = execution.PromptExecutor(_ServerStub(), **executor_kwargs())
    return _EXECUTOR


def run_prompt(prompt: dict, executor=None) -> dict:
    """Validate and execute an API-format prompt with ComfyUI's executor.

    Returns {"executed": set(node ids that ran this time), "cached": [...], "ui": history outputs,
    "messages": [...]}. Raises GraphError with ComfyUI's own message on a validation or execution error.
    """
    register_test_nodes()
    ex = executor or get_executor()
    prompt_id = str(uuid.uuid4())
    valid = asyncio.run(execution.validate_prompt(prompt_id, prompt, None))
    if not valid[0] or valid[3]:  # valid[3]: per-node errors; ComfyUI still runs the outputs that validated
        raise GraphError(f"prompt invalid: {valid[1]} {valid[3]}", valid)
    ex.server.messages = []
    ex.execute(prompt, prompt_id, extra_data={"client_id": "zsve-test"}, execute_outputs=valid[2])
    msgs = list(ex.server.messages) + list(ex.status_messages)
    for event, data in ex.status_messages:
        if event == "execution_error":
            raise GraphError(f"{data['node_type']} (node {data['node_id']}): {data['exception_message']}", data)
        if event == "execution_interrupted":
            raise GraphError("execution interrupted", data)
    executed = set()
    cached = []
    for event, data in msgs:
        if event == "executing" and data.get("node") is not None:
            executed.add(str(data["node"]))
        if event == "execution_cached":
            cached = list(data.get("nodes", []))
    return {"executed": executed, "cached": cached, "ui": ex.history_result, "messages": msgs}


def cleanup():
    comfy.model_management.cleanup_models_gc()


class ZSVETestCheckpoint:
    """Test-only stand-in for CheckpointLoaderSimple: (MODEL, CLIP, VAE) registered in OBJECTS[key]."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"key": ("STRING", {"default": "ckpt"})}}

    RETURN_TYPES = ("MODEL", "CLIP", "VAE")
    FUNCTION = "run"
    CATEGORY = "testing"

    @classmethod
    def IS_CHANGED(cls, key):
        return str(id(OBJECTS.get(key)))

    def run(self, key):
        return tuple(OBJECTS[key])


nodes.NODE_CLASS_MAPPINGS.setdefault("ZSVETestCheckpoint", ZSVETestCheckpoint)


def write_video(frames, path, fps: int = 8) -> str:
    """Write IMAGE frames [F,H,W,3] (0..1) as an H.264 mp4 through ComfyUI's own video type."""
    from fractions import Fraction

    from comfy_api.latest import InputImpl, Types

    video = InputImpl.VideoFromComponents(Types.VideoComponents(images=frames, audio=None, frame_rate=Fraction(fps)))
    video.save_to(str(path))
    return str(path)


def moving_square_frames(frames: int = 8, size: int = 64, seed: int = 0):
    """A simple synthetic clip: a red square moving over blue stripes (used until/besides the toy world)."""
    g = torch.Generator().manual_seed(seed)
    img = torch.zeros(frames, size, size, 3)
    stripes = ((torch.arange(size) // 8) % 2).float()
    img[..., 2] = 0.4 + 0.5 * stripes[None, :, None]
    s = size // 4
    y0 = int(torch.randint(0, size - s, (1,), generator=g))
    for f in range(frames):
        x0 = int(f * (size - s) / max(1, frames - 1))
        img[f, y0:y0 + s, x0:x0 + s] = torch.tensor([0.9, 0.1, 0.1])
    return img


def make_tiny_controlnet(model, seed: int = 0):
    """A tiny ControlNet matching a tiny MODEL, through comfy.cldm + comfy.controlnet (random weights)."""
    import copy

    import comfy.cldm.cldm
    import comfy.controlnet
    import comfy.ops

    cfg = copy.deepcopy(model.model.model_config.unet_config)
    cfg.pop("out_channels", None)
    cfg.update(hint_channels=3, operations=comfy.ops.disable_weight_init, dtype=torch.float32,
               device=torch.device("cpu"))
    cn = comfy.cldm.cldm.ControlNet(**cfg)
    init_module_(cn, seed + 7)
    return comfy.controlnet.ControlNet(cn, load_device=torch.device("cpu"), manual_cast_dtype=None)


_PAIRS: dict = {}


def prompt_pair(clip, source: str, edit: str, negative: str = ""):
    """The prompt pair Edit Prompts makes (cached per CLIP and texts)."""
    from zsve.nodes.prompts import make_prompt_pair

    key = (id(clip), source, edit, negative)
    if key not in _PAIRS:
        _PAIRS[key] = make_prompt_pair(clip, source, edit, negative)
    return _PAIRS[key]


def processors_of_row(monkeypatch, module, run) -> list:
    """The attention processors on the model a toy benchmark row samples: `run()` calls the row, whose
    `module.sample_from` is stopped at its first call (nothing is sampled); returns the sampled model's processors."""
    import pytest
    import torch

    from zsve.nodes._attn_patch import PROCESSORS_KEY

    seen = {}

    class _Stop(Exception):
        pass

    def capture(edit_model, *args, **kwargs):
        seen["procs"] = list(edit_model.model_options["transformer_options"][PROCESSORS_KEY])
        raise _Stop

    monkeypatch.setattr(module, "sample_from", capture)
    with pytest.raises(_Stop), torch.inference_mode():
        run()
    return seen["procs"]


def node_calls(monkeypatch, node_cls) -> list:
    """Record every call of a V3 node's `execute` (the node still runs): a list that grows by (args, kwargs) per call,
    args without the class."""
    calls = []
    orig = node_cls.execute.__func__

    def spy(cls, *args, **kwargs):
        calls.append((args, kwargs))
        return orig(cls, *args, **kwargs)

    monkeypatch.setattr(node_cls, "execute", classmethod(spy))
    return calls
