"""Boot the real ComfyUI as a library on CPU and load this pack through ComfyUI's own custom-node loader.

Used by tests/conftest.py and by the project's scripts (demo, workflow generator, benchmarks).
"""

from __future__ import annotations

import asyncio
import os
import sys
import tempfile
from pathlib import Path


class ComfyNotFound(RuntimeError):
    pass


ROOT = Path(__file__).resolve().parents[1]
PACK_NAME = "zero_shot_video_edit"


def _is_comfy(p: Path) -> bool:
    return (p / "comfy" / "model_management.py").is_file() and (p / "execution.py").is_file()


def _find_comfyui() -> Path:
    env = os.environ.get("COMFYUI_PATH")
    if env:
        if _is_comfy(Path(env)):
            return Path(env).resolve()
        raise ComfyNotFound(f"COMFYUI_PATH={env} is not a ComfyUI checkout (no comfy/model_management.py).")
    if ROOT.parent.name == "custom_nodes" and _is_comfy(ROOT.parent.parent):
        return ROOT.parent.parent
    home = Path.home() / "comfy" / "ComfyUI"
    if _is_comfy(home):
        return home
    raise ComfyNotFound(
        "ComfyUI not found. Set COMFYUI_PATH=/path/to/ComfyUI, place this pack in ComfyUI/custom_nodes/, "
        "or put a ComfyUI checkout at ~/comfy/ComfyUI; `bash scripts/test.sh` does this for you."
    )


COMFYUI = _find_comfyui()
if str(COMFYUI) not in sys.path:
    sys.path.insert(0, str(COMFYUI))

# ComfyUI must be configured before comfy.model_management is imported.
import comfy.options  # noqa: E402

comfy.options.args_parsing = False
from comfy.cli_args import args  # noqa: E402

args.cpu = True
args.use_pytorch_cross_attention = True
args.force_fp32 = True
args.fp32_text_enc = True
args.disable_all_custom_nodes = False

import torch  # noqa: E402

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

import importlib  # noqa: E402
import logging  # noqa: E402
import re  # noqa: E402


class _CoreImportNoise(logging.Filter):
    """Holds back, while ComfyUI's core boots, its warnings about optional core nodes that cannot import here (the
    audio nodes: no torchaudio build matches the pinned torch) and says it in one line afterwards (`summary`).
    Any other warning passes unchanged. ZSVE_CORE_LOG=1 shows everything as ComfyUI logs it."""

    KNOWN = re.compile(r"torchaudio|IMPORT FAILED|Cannot import .*comfy_extras|comfy_extras/ nodes did not import|"
                       r"missing dependencies added|pip install -r requirements.txt|^\s*$|^Traceback \(most recent call last\)", re.S)

    def __init__(self):
        super().__init__()
        self.held: list[str] = []

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        if record.levelno >= logging.WARNING and self.KNOWN.search(msg):
            self.held.append(msg)
            return False
        return True

    def summary(self) -> str | None:
        if not self.held:
            return None
        failed = sorted(set(re.findall(r"IMPORT FAILED: (\S+)", "\n".join(self.held))))
        missing = sorted(set(re.findall(r"No module named '([^']+)'", "\n".join(self.held))))
        what = ("audio nodes this pack does not use" if failed and all("audio" in f for f in failed)
                else "check whether your graph needs them")
        return (f"[zsve] ComfyUI core: {len(failed)} optional core node module(s) not loaded "
                f"({', '.join(failed) or 'none'}; missing {', '.join(missing) or 'a dependency'}): {what} "
                "(ZSVE_CORE_LOG=1 shows ComfyUI's full log)")


_NOISE = _CoreImportNoise()
if os.environ.get("ZSVE_CORE_LOG") != "1":
    logging.getLogger().addFilter(_NOISE)

# Order matters (as in ComfyUI's main.py): ComfyUI's own `utils` package before `nodes`, which puts
# ComfyUI/comfy first on sys.path. importlib keeps import sorters from reordering these.
importlib.import_module("comfy.model_management")
importlib.import_module("utils.extra_config")
comfy_utils = importlib.import_module("comfy.utils")
nodes = importlib.import_module("nodes")
importlib.import_module("execution")

comfy_utils.PROGRESS_BAR_ENABLED = os.environ.get("ZSVE_PROGRESS") == "1"



def _load_pack():
    """Load the pack exactly as ComfyUI loads a custom node: by path, through nodes.load_custom_node."""
    try:
        asyncio.run(nodes.init_extra_nodes(init_custom_nodes=False, init_api_nodes=False))
    finally:
        logging.getLogger().removeFilter(_NOISE)
    if _NOISE.summary():
        print(_NOISE.summary(), file=sys.stderr)
    tmp = Path(tempfile.mkdtemp(prefix="zsve-test-"))
    (tmp / "custom_nodes").mkdir()
    link = tmp / "custom_nodes" / PACK_NAME
    link.symlink_to(ROOT, target_is_directory=True)
    before = set(nodes.NODE_CLASS_MAPPINGS)
    ok = asyncio.run(nodes.load_custom_node(str(link)))
    if not ok:
        raise RuntimeError("ComfyUI's loader failed to load the pack; see the log above.")
    sys_name = str(link).replace(".", "_x_")
    pack = sys.modules[sys_name]
    # Alias the loaded package as `zsve` so tests can `import zsve.attention.ddim` and get the very module objects
    # ComfyUI loaded (no second copy): every `zsve.<sub>` import resolves to `<real name>.<sub>`, imported under its
    # real name if the pack had not yet. (Copying only the modules loaded so far made `import zsve.toy.scenes`
    # create a second package `zsve.toy`; once the pack imported its real `toy`, `import zsve.toy.scenes as sc`
    # looked in the real one and failed, depending on the order of the tests.)
    sys.modules["zsve"] = pack
    sys.meta_path.insert(0, _PackAlias(sys_name))
    return pack, sorted(set(nodes.NODE_CLASS_MAPPINGS) - before)


class _PackAlias:
    """Import finder for `zsve.<sub>`: imports `<pack's real name>.<sub>` and hands back that module object."""

    def __init__(self, real: str):
        self.real = real

    def find_spec(self, name, path=None, target=None):
        if not name.startswith("zsve."):
            return None
        import importlib.util

        real = importlib.import_module(self.real + name[len("zsve"):])
        return importlib.util.spec_from_loader(name, self, is_package=hasattr(real, "__path__"))

    def create_module(self, spec):
        return sys.modules[self.real + spec.name[len("zsve"):]]

    def exec_module(self, module):
        pass  # already executed under its real name


PACK, PACK_NODE_IDS = _load_pack()


