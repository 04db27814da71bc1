"""Boot the real ComfyUI as a library on CPU, load this pack through ComfyUI's own custom-node loader,
and offer tiny SD1.5-architecture models built through ComfyUI's own classes.

Nothing of ComfyUI is mocked. ComfyUI is found through COMFYUI_PATH, the ComfyUI whose custom_nodes/
holds this checkout, or ~/comfy/ComfyUI (see scripts/env.sh, which the test command uses).
"""

from __future__ import annotations

import pytest

from zsve_boot import PACK, PACK_NODE_IDS  # boots ComfyUI before anything imports comfy
from zsve_harness import make_tiny_clip, make_tiny_model, make_tiny_vae, run_prompt

# The compatibility selection (`pytest -m compat`): what scripts/test.sh runs on every further ComfyUI checkout
# (README, "Tested ComfyUI versions"). Kept short (about two minutes on 2 cores): the pack loads and every node
# schema builds, every shipped workflow runs headless (test_workflows.py), the context windows (the handler, the
# inversion, Video-P2P's windowed guider, one workflow with FateZero's store and latent blending under windows),
# the attention dispatcher with and without processors, tests/test_compat.py (the ComfyUI APIs the pack
# builds on), Edit Prompts' tokenization (test_prompts.py), the edit contract's wrapper on every method and
# the SDXL essentials (test_sdxl.py), FateZero's recompute mode (its source pass goes through the guider's
# conditionings and calc_cond_batch: test_store_recompute.py).
COMPAT_MODULES = {"test_compat.py", "test_pack.py", "test_workflows.py", "test_attn_patch.py", "test_prompts.py",
                  "test_store_recompute.py"}
COMPAT_TESTS = {  # module::test (every parametrization) or module::test[param]
    "test_composition.py::test_inversion_and_reconstruction_under_core_context_windows",
    "test_composition.py::test_key_frames_join_every_window_and_are_fused_only_from_their_own",
    "test_videop2p.py::test_context_windows_give_the_unwindowed_edit_without_temporal_attention",
    "test_every_method_composes.py::test_workflow_under_context_windows[fatezero_latent_blend_edit]",
    "test_contract.py::test_a_correct_run_passes_and_every_method_installs_the_contract",
    "test_contract.py::test_noise_added_on_top_of_z_T_is_refused[add_noise enable-fatezero]",
    "test_contract.py::test_fewer_steps_than_the_inversion_are_refused[10-5-videop2p]",
    "test_contract.py::test_a_latent_that_is_not_the_inversions_z_T_is_warned_in_the_ui_text",
    # SDXL (issue 19): the architecture read from the UNet config, EDM refused, each Video-P2P branch's own
    # conditioning (text and pooled/size vector), FateZero's fusion exact at the inversion's inputs
    "test_sdxl.py::test_layout_and_defaults_follow_the_unet",
    "test_sdxl.py::test_edm_models_are_refused_before_any_unet_call",
    "test_sdxl.py::test_videop2p_each_branch_is_plain_sampling_with_its_own_prompt",
    "test_sdxl.py::test_fatezero_store_records_fatezeros_levels_and_fusion_is_exact",
}


def pytest_configure(config):
    config.addinivalue_line("markers", "compat: the compatibility selection run on every ComfyUI checkout "
                                       "(scripts/test.sh)")


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    for item in items:
        module = item.path.name
        if module in COMPAT_MODULES or {f"{module}::{item.originalname}", f"{module}::{item.name}"} & COMPAT_TESTS:
            item.add_marker(pytest.mark.compat)


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
