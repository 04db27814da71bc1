"""Boot the real ComfyUI as a library on CPU, load this pack through ComfyUI's own custom-node loader,
and offer tiny SD1.5-architecture models built through ComfyUI's own classes.

Nothing of ComfyUI is mocked. ComfyUI is found through COMFYUI_PATH, the ComfyUI whose custom_nodes/
holds this checkout, or ~/comfy/ComfyUI (see scripts/env.sh, which the test command uses).
"""

from __future__ import annotations

import pytest

from zsve_boot import PACK, PACK_NODE_IDS  # boots ComfyUI before anything imports comfy
from zsve_harness import make_tiny_clip, make_tiny_model, make_tiny_vae, run_prompt


@pytest.fixture(scope="session")
def pack():
    return PACK


@pytest.fixture(scope="session")
def pack_node_ids():
    return PACK_NODE_IDS


@pytest.fixture(scope="session")
def tiny_model():
    return make_tiny_model(seed=0)


@pytest.fixture(scope="session")
def tiny_clip():
    return make_tiny_clip(seed=0)


@pytest.fixture(scope="session")
def tiny_vae():
    return make_tiny_vae(seed=0)


@pytest.fixture
def executor():
    """Run an API-format prompt through ComfyUI's real executor: executor(prompt, outputs=None)."""
    return run_prompt


@pytest.fixture
def io_dirs(tmp_path):
    """ComfyUI's input/output directories pointed at tmp_path/in and tmp_path/out for one test, then restored."""
    import folder_paths

    old_in, old_out = folder_paths.get_input_directory(), folder_paths.get_output_directory()
    (tmp_path / "in").mkdir()
    (tmp_path / "out").mkdir()
    folder_paths.set_input_directory(str(tmp_path / "in"))
    folder_paths.set_output_directory(str(tmp_path / "out"))
    yield tmp_path
    folder_paths.set_input_directory(old_in)
    folder_paths.set_output_directory(old_out)
