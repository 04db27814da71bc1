"""The algorithms of the pack, free of ComfyUI imports (torch and numpy only).

See docs/ARCHITECTURE.md for the map of modules.
"""
