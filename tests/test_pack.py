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
        assert schema.category.startswith("zero-shot video edit"), node_id
        for inp in schema.inputs or []:
            assert inp.tooltip, f"{node_id}.{inp.id} has no tooltip"
        for out in schema.outputs or []:
            assert out.tooltip, f"{node_id} output {out.display_name} has no tooltip"
            t = out.get_io_type() if hasattr(out, "get_io_type") else out.io_type
            if t not in ("MODEL", "LATENT", "CONDITIONING", "SAMPLER", "SIGMAS", "GUIDER", "IMAGE", "MASK",
                         "VIDEO", "CLIP", "VAE", "INT", "FLOAT", "STRING", "BOOLEAN", "NOISE", "CONTROL_NET"):
                assert t.startswith("ZSVE_"), f"custom type {t} of {node_id} lacks the pack prefix"


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
