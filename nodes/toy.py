"""ToyModelLoader: loads the pack's self-trained toy SD1.5-architecture model (a demo and test aid)."""

from __future__ import annotations

from pathlib import Path

from comfy_api.latest import io

from ._comfy import CATEGORY

WEIGHTS_DIR = Path(__file__).resolve().parents[1] / "toy" / "weights"
DEFAULT_WEIGHTS = "toy_sd15.safetensors"


def _choices() -> list[str]:
    found = sorted(p.name for p in WEIGHTS_DIR.glob("*.safetensors")) if WEIGHTS_DIR.is_dir() else []
    return [DEFAULT_WEIGHTS] + [f for f in found if f != DEFAULT_WEIGHTS]


class ToyModelLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ToyModelLoader",
            display_name="Load Toy Model (demo)",
            category=CATEGORY + "/Toy",
            description=(
                "Demo and test aid: loads the pack's tiny SD1.5-architecture model, trained by the project itself "
                "(toy/train.py) on procedural scenes such as 'a red circle on blue stripes' (128x128 images, 16x16 "
                "latents). Use it like any checkpoint: CLIPTextEncode -> KSampler -> VAE Decode, or with the pack's "
                "video editing nodes on the toy clips. It only knows circles, squares and triangles in red, green, "
                "blue and yellow on plain, striped, dotted or gradient backgrounds; it is not a general model. "
                "ComfyUI's checkpoint loader does not detect it as SD1.5 (it is too small), hence this node."
            ),
            inputs=[
                io.Combo.Input("weights", options=_choices(), default=DEFAULT_WEIGHTS,
                               tooltip="A toy checkpoint from the pack's toy/weights folder (one safetensors file "
                               "with the UNet and text encoder; the hand-set VAE is rebuilt from its settings)."),
            ],
            outputs=[
                io.Model.Output(display_name="MODEL", tooltip="The toy UNet (SD1.5 architecture, v-prediction, "
                                "SD1.5 noise schedule)."),
                io.Clip.Output(display_name="CLIP", tooltip="The toy text encoder: the real SD1 tokenizer with a small "
                               "frozen CLIP-L-architecture transformer. Use with CLIP Text Encode."),
                io.Vae.Output(display_name="VAE", tooltip="The toy VAE (TAESD format, hand-set): 8x8 block average "
                              "encoder, nearest-neighbour decoder; 128x128 images <-> 16x16 latents."),
            ],
        )

    @classmethod
    def execute(cls, weights) -> io.NodeOutput:
        from ..toy import model as toy_model

        path = WEIGHTS_DIR / Path(weights).name
        if not path.is_file():
            raise FileNotFoundError(
                f"ToyModelLoader: {path} does not exist. The toy weights ship with the pack in toy/weights/; "
                "reinstall the pack or train them with `python -m toy.train` from the pack folder."
            )
        model, clip, vae, _ = toy_model.load(path)
        return io.NodeOutput(model, clip, vae)


NODES = [ToyModelLoader]
