"""The pack loads through ComfyUI's own loader and follows the V3 conventions."""

import nodes


def test_pack_registers_its_nodes(pack_node_ids):
    for node_id in ["VideoDDIMInvert", "DDIMInversionSampler", "DDIMInversionSigmas"]:
        assert node_id in pack_node_ids
        assert node_id in nodes.NODE_CLASS_MAPPINGS


def test_every_node_has_description_tooltips_and_category(pack_node_ids):
    for node_id in pack_node_ids:
        cls = nodes.NODE_CLASS_MAPPINGS[node_id]
        schema = cls.define_schema()
        assert schema.description, f"{node_id} has no description"
        assert schema.category.startswith("Zero-Shot Video Edit"), node_id
        for inp in schema.inputs or []:
            assert inp.tooltip, f"{node_id}.{inp.id} has no tooltip"
        for out in schema.outputs or []:
            assert out.tooltip, f"{node_id} output {out.display_name} has no tooltip"
            t = out.get_io_type() if hasattr(out, "get_io_type") else out.io_type
            if t not in ("MODEL", "LATENT", "CONDITIONING", "SAMPLER", "SIGMAS", "GUIDER", "IMAGE", "MASK",
                         "VIDEO", "CLIP", "VAE", "INT", "FLOAT", "STRING", "BOOLEAN", "NOISE", "CONTROL_NET"):
                assert t.startswith("ZSVE_"), f"custom type {t} of {node_id} lacks the pack prefix"


# The methods as they spell themselves: a node in a method's category names it in its display name, so that the
# node library's search finds it by the method (issue 22); Temporal Self-Attention serves FateZero and Video-P2P.
METHODS = {"FateZero": "FateZero", "Video-P2P": "Video-P2P", "InFusion": "InFusion", "Blended Latent": "Blended Latent"}
ALSO = {"TemporalSelfAttentionPatch": ["Video-P2P"], "LatentBlendWithInversion": ["FateZero"]}


def test_library_names_and_categories_read_alike(pack_node_ids):
    """One casing for the categories (Title Case, the methods as they spell themselves) and the method in the
    display name of every node that belongs to one."""
    for node_id in pack_node_ids:
        schema = nodes.NODE_CLASS_MAPPINGS[node_id].define_schema()
        parts = schema.category.split("/")
        assert parts[0] == "Zero-Shot Video Edit", node_id
        for part in parts[1:]:
            assert part in METHODS or all(w[0].isupper() for w in part.split()), (node_id, schema.category)
        method = parts[1] if len(parts) > 1 and parts[1] in METHODS else None
        for m in ([method] if method else []) + ALSO.get(node_id, []):
            assert METHODS[m].lower() in schema.display_name.lower(), (node_id, schema.display_name, m)
    temporal = nodes.NODE_CLASS_MAPPINGS["TemporalSelfAttentionPatch"].define_schema().display_name.lower()
    assert "fatezero" in temporal and "video-p2p" in temporal


def test_pack_uses_only_relative_imports(pack):
    import ast
    from pathlib import Path

    root = Path(pack.__file__).parent
    local = {p.stem for p in root.iterdir()} | {p.name for p in root.iterdir() if p.is_dir()}
    for path in list(root.glob("*.py")) + list(root.glob("nodes/*.py")) + list(root.glob("attention/*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                assert node.module.split(".")[0] not in local - {"nodes"} or node.module == "nodes", (path, node.module)
            if isinstance(node, ast.Import):
                for a in node.names:
                    assert a.name.split(".")[0] not in {"attention", "toy"}, (path, a.name)


def test_attention_package_imports_no_comfyui(pack):
    import ast
    from pathlib import Path

    root = Path(pack.__file__).parent / "attention"
    for path in root.glob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            for n in names:
                top = n.split(".")[0]
                assert top not in {"comfy", "comfy_api", "comfy_extras", "nodes", "execution", "folder_paths",
                                   "latent_preview"}, f"{path.name} imports {n}"


def test_tests_see_the_packs_own_module_objects_under_zsve(pack):
    """tests/zsve_boot.py aliases the pack ComfyUI loaded as `zsve`: a submodule first imported as `zsve.X` (here
    after the pack imported its real `toy` package, as the Toy Model loader does) is the pack's own module object, so
    `import zsve.toy.scenes as sc` works whatever ran before (it failed once the loader node had run: a second
    `zsve.toy` package had been made)."""
    import importlib
    import sys

    real = pack.__name__
    importlib.import_module(real + ".toy.model")  # what the loader node's relative import does
    import zsve.toy.attn_loss as al

    assert al is sys.modules[real + ".toy.attn_loss"]
    assert sys.modules["zsve.toy"] is sys.modules[real + ".toy"] is importlib.import_module("zsve").toy
