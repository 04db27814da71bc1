// The shipped workflows' "Read me" note at a readable size (issue 22).
//
// A MarkdownNote's text is a DOM element drawn at the canvas zoom, in the user's textarea font size
// (setting Comfy.TextareaWidget.FontSize, 10 px by default): 7 px on screen at the workflows' starting zoom (0.6-0.75).
// scripts/make_workflows.py gives its note a font size in the node's properties (`zsve_text_px`, chosen so that the
// text is about 12 px on screen at the starting zoom); this sets it on that note's own element, through the
// frontend's `--comfy-textarea-font-size` variable, which the markdown widget's CSS reads. Other notes and the user's
// setting are left alone (a larger setting wins); without this file the note shows, only smaller.
import { app } from "../../../scripts/app.js";

app.registerExtension({
  name: "zero_shot_video_edit.ReadMeNote",
  loadedGraphNode(node) {
    const want = Number(node.properties?.zsve_text_px);
    if (node.type !== "MarkdownNote" || !(want > 0)) return;
    // a user who set a larger textarea font keeps it
    const user = parseFloat(getComputedStyle(document.documentElement).getPropertyValue("--comfy-textarea-font-size"));
    const px = Math.max(want, user || 0);
    for (const widget of node.widgets ?? []) {
      widget.inputEl?.style?.setProperty("--comfy-textarea-font-size", `${px}px`);
    }
  },
});
