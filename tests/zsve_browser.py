"""The real ComfyUI frontend meets the shipped workflows: ComfyUI's server on 127.0.0.1 with this pack in its
custom_nodes, the frontend package its requirements.txt pins, headless Chromium (Debian's `chromium`) driven by
Playwright (PyPI) with the system browser.

Used by tests/test_browser.py; `bash scripts/run.sh tests/zsve_browser.py` opens every workflow once and writes the
screenshots (the starting view and the whole graph) to output/browser/ for a look by eye.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACK_NAME = "zero_shot_video_edit"
CHROMIUM = os.environ.get("ZSVE_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage"]
VIEWPORT = {"width": 1600, "height": 1000}


class BrowserUnavailable(RuntimeError):
    """No browser or no Playwright here (the message says what is missing and how to install it)."""


def required_frontend_version(comfy: Path) -> str | None:
    for line in (comfy / "requirements.txt").read_text().splitlines():
        if line.strip().startswith("comfyui-frontend-package=="):
            return line.split("==", 1)[1].strip()
    return None


def check_available(comfy: Path) -> None:
    """Raises BrowserUnavailable naming what is missing: the browser, Playwright or the pinned frontend."""
    if not (Path(CHROMIUM).is_file() and os.access(CHROMIUM, os.X_OK)):
        raise BrowserUnavailable(f"no Chromium at {CHROMIUM} (Debian: `apt-get install -y chromium`; "
                                 "scripts/env.sh's zsve_browser does it where apt works; ZSVE_CHROMIUM=path)")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError as e:
        raise BrowserUnavailable("Playwright is not installed (`pip install playwright`; scripts/env.sh's "
                                 "zsve_browser does it)") from e
    from importlib.metadata import PackageNotFoundError, version

    want = required_frontend_version(comfy)
    try:
        have = version("comfyui-frontend-package")
    except PackageNotFoundError:
        have = None
    if want is not None and have != want:
        raise BrowserUnavailable(f"comfyui-frontend-package {have} installed, {comfy}/requirements.txt pins {want}")


def write_input(path: Path) -> None:
    """A small real file of the kind the name says (a video plays in Load Video, a mask shows in Load Image)."""
    import numpy as np

    if path.suffix == ".mp4":
        import av

        with av.open(str(path), "w") as out:
            s = out.add_stream("libx264", rate=8)
            s.width = s.height = 64
            s.pix_fmt = "yuv420p"
            for i in range(8):
                img = np.zeros((64, 64, 3), np.uint8)
                img[:, :, 2] = 160
                img[20:44, 8 + 4 * i:32 + 4 * i, 0] = 220
                for pkt in s.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                    out.mux(pkt)
            for pkt in s.encode():
                out.mux(pkt)
    else:
        from PIL import Image

        img = np.zeros((64, 64, 3), np.uint8)
        img[16:48, 16:48] = 255
        Image.fromarray(img).save(path)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """ComfyUI's main.py in a subprocess, on a base directory of its own: custom_nodes/<pack> (a link to this
    checkout), models/checkpoints|loras|controlnet with empty files named as in the workflows (so the combos hold
    the workflows' values), input/input.mp4 and input/mask.png."""

    def __init__(self, comfy: Path, model_files: dict[str, list[str]], input_files: list[str]):
        self.comfy = comfy
        self.base = Path(tempfile.mkdtemp(prefix="zsve-browser-"))
        (self.base / "custom_nodes").mkdir()
        (self.base / "custom_nodes" / PACK_NAME).symlink_to(ROOT)
        for folder, names in model_files.items():
            (self.base / "models" / folder).mkdir(parents=True, exist_ok=True)
            for name in names:
                (self.base / "models" / folder / name).write_bytes(b"")
        (self.base / "input").mkdir()
        for name in input_files:
            write_input(self.base / "input" / name)
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = self.base / "server.log"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 180.0) -> None:
        cmd = [sys.executable, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(self.port),
               "--base-directory", str(self.base), "--disable-auto-launch", "--database-url", "sqlite:///:memory:"]
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(cmd, cwd=self.comfy, stdout=self._log, stderr=subprocess.STDOUT)
        t0 = time.time()
        while time.time() - t0 < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI's server exited ({self.proc.returncode}):\n{self.log()[-3000:]}")
            try:
                with urllib.request.urlopen(self.url + "/object_info/CheckpointLoaderSimple", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.5)
        raise RuntimeError(f"ComfyUI's server did not answer in {timeout:.0f}s:\n{self.log()[-3000:]}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        if getattr(self, "_log", None):
            self._log.close()
        shutil.rmtree(self.base, ignore_errors=True)


def workflow_needs(paths: list[Path]) -> tuple[dict[str, list[str]], list[str]]:
    """The model files (per models/ folder) and input files the workflows name, for the server's base directory."""
    folders = {"CheckpointLoaderSimple": ("checkpoints", 0), "LoraLoader": ("loras", 0),
               "ControlNetLoader": ("controlnet", 0)}
    models: dict[str, list[str]] = {}
    inputs = set()
    for p in paths:
        for n in json.loads(p.read_text())["nodes"]:
            if n["type"] in folders:
                folder, i = folders[n["type"]]
                models.setdefault(folder, []).append(n["widgets_values"][i])
            if n["type"] == "LoadVideo":
                inputs.add(n["widgets_values"][0])
            if n["type"] in ("LoadImage", "LoadImageMask"):
                inputs.add(n["widgets_values"][0])
    return {k: sorted(set(v)) for k, v in models.items()}, sorted(inputs)


# Loads a workflow the way a drop on the canvas does (app.handleFile with a File), then reads back what the frontend
# made of it. Returns the report the test checks.
LOAD_JS = """
async ([name, text]) => {
  const app = window.app;
  const file = new File([text], name, {type: 'application/json'});
  await app.handleFile(file);
  await new Promise(r => setTimeout(r, 1000));  // media previews load and resize their nodes
  const g = app.graph;
  const ctx = app.canvas.ctx;
  const measure = (text, font) => { ctx.save(); ctx.font = font; const w = ctx.measureText(String(text)).width;
                                    ctx.restore(); return w; };
  const titleFont = app.canvas.title_text_font, innerFont = app.canvas.inner_text_font;
  const nodes = g._nodes.map(n => {
    const size = n.computeSize ? Array.from(n.computeSize()) : null;
    const text = {title: measure(n.title, titleFont), font: [titleFont, innerFont],
                  widgets: (n.widgets || []).filter(w => typeof w.value !== 'object').map(
                    w => [w.name, w.type, measure(w.label || w.name, innerFont),
                          measure(typeof w.value === 'number' ? w.value.toFixed(w.options?.precision ?? 2)
                                  : w.value, innerFont)])};
    return {id: n.id, type: n.type, title: n.title, pos: Array.from(n.pos), size: Array.from(n.size),
            min_size: size, text, registered: !!LiteGraph.registered_node_types[n.type],
            has_errors: !!n.has_errors, has_media: !!(n.imgs && n.imgs.length) ||
              (n.widgets || []).some(w => String(w.name).endsWith('-preview')),
            widgets: (n.widgets || []).map(w => ({name: w.name, value: w.value, type: w.type})),
            inputs: (n.inputs || []).map(i => ({name: i.name, link: i.link})),
            outputs: (n.outputs || []).map(o => ({name: o.name, links: o.links ? Array.from(o.links) : []}))};
  });
  const links = [];
  const lk = g.links instanceof Map ? Array.from(g.links.values()) : Object.values(g.links || {});
  for (const l of lk) if (l) links.push([l.id, l.origin_id, l.origin_slot, l.target_id, l.target_slot, l.type]);
  // the links as drawn: from the frontend's own slot positions, between the nodes' bounding boxes (title included)
  const curves = lk.filter(l => l).map(l => [l.id, l.origin_id, l.target_id,
    Array.from(g.getNodeById(l.origin_id).getOutputPos(l.origin_slot)),
    Array.from(g.getNodeById(l.target_id).getInputPos(l.target_slot))]);
  const boxes = g._nodes.map(n => [n.id, Array.from(n.boundingRect), n.title]);
  // the Markdown notes' text as shown: the computed font size of their paragraphs times the element's on-screen
  // scale (the DOM widget is scaled with the canvas), whether all of the text fits its box, where it is on screen
  app.canvas.setDirty(true, true);
  await new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)));
  const canvasRect = app.canvas.canvas.getBoundingClientRect();
  const notes = Array.from(document.querySelectorAll('.comfy-markdown .tiptap')).map(el => {
    const r = el.getBoundingClientRect();
    const onScreen = el.offsetWidth ? r.width / el.offsetWidth : 0;
    const fonts = Array.from(el.querySelectorAll('p, li')).map(p => parseFloat(getComputedStyle(p).fontSize));
    return {font_px: Math.min(...fonts), screen_scale: onScreen, scroll_h: el.scrollHeight, client_h: el.clientHeight,
            rect: [r.x - canvasRect.x, r.y - canvasRect.y, r.width, r.height],
            canvas: [canvasRect.width, canvasRect.height], text: el.innerText.slice(0, 60)};
  });
  const dialogs = Array.from(document.querySelectorAll('.p-dialog')).map(d => d.innerText.slice(0, 500));
  const p = await app.graphToPrompt();
  const ds = app.canvas.ds;
  return {nodes, links, curves, boxes, notes, groups: g._groups.length, dialogs, prompt: p.output,
          view: {scale: ds.scale, offset: Array.from(ds.offset)}};
}
"""


class Browser:
    def __init__(self, url: str):
        from playwright.sync_api import sync_playwright

        self.url = url
        self.user_data = tempfile.mkdtemp(prefix="zsve-chromium-")
        self._pw = sync_playwright().start()
        self.context = self._pw.chromium.launch_persistent_context(
            self.user_data, executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS, viewport=VIEWPORT)
        self.page = self.context.pages[0] if self.context.pages else self.context.new_page()
        self.console: list[dict] = []
        self.page.on("console", lambda m: self.console.append({"type": m.type, "text": m.text,
                                                                "url": (m.location or {}).get("url", "")}))
        self.page.on("pageerror", lambda e: self.console.append({"type": "pageerror", "text": str(e), "url": ""}))

    def open_app(self, timeout_ms: int = 120_000) -> None:
        self.page.goto(self.url, timeout=timeout_ms)
        self.page.wait_for_function("() => window.app && window.app.graph && window.app.canvas && "
                                    "window.LiteGraph && LiteGraph.registered_node_types['VideoDDIMInvert']",
                                    timeout=timeout_ms)
        # the first-run dialog (the templates browser) would cover the canvas: close it
        try:
            self.page.wait_for_selector(".p-dialog", timeout=5000)
        except Exception:  # playwright's TimeoutError: no dialog opened
            pass
        for _ in range(3):
            buttons = self.page.query_selector_all(".p-dialog .p-dialog-close-button, .p-dialog [aria-label=Close]")
            if not buttons:
                break
            buttons[0].click()
            self.page.wait_for_timeout(300)

    def load(self, path: Path) -> dict:
        self.console.clear()
        report = self.page.evaluate(LOAD_JS, [path.name, path.read_text()])
        self.page.wait_for_timeout(300)
        report["console"] = list(self.console)
        return report

    def screenshot(self, path: Path) -> None:
        self.page.screenshot(path=str(path))

    def overview(self, path: Path) -> None:
        """A screenshot of the whole graph (zoomed to fit the canvas), then the view as it was."""
        self.page.evaluate("""() => {
          const c = app.canvas, ds = c.ds, nodes = app.graph._nodes, groups = app.graph._groups;
          window.__zsve_view = [ds.scale, Array.from(ds.offset)];
          const boxes = nodes.map(n => [n.pos[0], n.pos[1] - 30, n.pos[0] + n.size[0], n.pos[1] + n.size[1]])
            .concat(groups.map(g => [g._bounding[0], g._bounding[1], g._bounding[0] + g._bounding[2],
                                      g._bounding[1] + g._bounding[3]]));
          const x0 = Math.min(...boxes.map(b => b[0])) - 20, y0 = Math.min(...boxes.map(b => b[1])) - 20;
          const x1 = Math.max(...boxes.map(b => b[2])) + 20, y1 = Math.max(...boxes.map(b => b[3])) + 20;
          // the canvas lies under the menu bars (about 80 px at the top) and the side bar (about 70 px)
          const el = c.canvas, s = Math.min((el.clientWidth - 90) / (x1 - x0), (el.clientHeight - 110) / (y1 - y0));
          ds.scale = s; ds.offset[0] = 80 / s - x0; ds.offset[1] = 90 / s - y0; c.setDirty(true, true);
        }""")
        self.page.wait_for_timeout(300)
        self.page.screenshot(path=str(path))
        self.page.evaluate("""() => { const [s, o] = window.__zsve_view; const ds = app.canvas.ds;
          ds.scale = s; ds.offset[0] = o[0]; ds.offset[1] = o[1]; app.canvas.setDirty(true, true); }""")

    def templates(self, path: Path) -> None:
        """A screenshot of the template browser on this pack's cards (file stem + thumbnail), then closed."""
        self.page.evaluate("() => app.extensionManager.command.execute('Comfy.BrowseTemplates')")
        self.page.wait_for_selector(".p-dialog", timeout=10_000)
        self.page.get_by_text(PACK_NAME, exact=True).first.click()
        self.page.wait_for_timeout(1500)
        self.page.screenshot(path=str(path))
        self.page.keyboard.press("Escape")
        self.page.wait_for_timeout(300)

    def close(self) -> None:
        try:
            self.context.close()
        finally:
            self._pw.stop()
            shutil.rmtree(self.user_data, ignore_errors=True)


def main():
    sys.path.insert(0, str(ROOT / "tests"))
    comfy = Path(os.environ.get("COMFYUI_PATH", Path.home() / "comfy" / "ComfyUI"))
    check_available(comfy)
    paths = sorted((ROOT / "workflows").glob("*.json"))
    models, inputs = workflow_needs(paths)
    server = Server(comfy, models, inputs)
    out = ROOT / "output" / "browser"
    out.mkdir(exist_ok=True)
    try:
        server.start()
        b = Browser(server.url)
        try:
            b.open_app()
            b.templates(out / "templates.png")
            for p in paths:
                r = b.load(p)
                b.screenshot(out / f"{p.stem}.png")
                b.overview(out / f"{p.stem}_overview.png")
                small = [(n["title"], n["size"], n["min_size"]) for n in r["nodes"]
                         if n["min_size"] and (n["size"][0] + 0.5 < n["min_size"][0]
                                               or n["size"][1] + 0.5 < n["min_size"][1])]
                print(p.stem, "view", r["view"], "groups", r["groups"], "dialogs", r["dialogs"],
                      "console", [c for c in r["console"] if c["type"] in ("error", "pageerror")][:5])
                print("  too small:", small)
                print("  sizes:", json.dumps({n["type"]: n["min_size"] for n in r["nodes"]}))
        finally:
            b.close()
    finally:
        server.stop()


if __name__ == "__main__":
    main()
