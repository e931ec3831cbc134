"""Saved outputs a reader without a kernel can use (GitHub, a rendered page): widgets drawn as text, and
the problems a saved output must not have (absolute paths, ANSI escapes, bars frozen at 0%).
Part of ``python -m course notebooks`` (``course.notebooks`` re-exports these).
"""

from __future__ import annotations

import html
import re

import nbformat

_WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"
_WIDGET_STATE = "application/vnd.jupyter.widget-state+json"
_TQDM_PARTS = ["HTMLModel", "FloatProgressModel", "HTMLModel"]  # tqdm.notebook's bar: label, bar, counts


def _widget_text(model_id: str, state: dict) -> str:
    """A static text for a widget, from its final state: a tqdm bar as its last line, else a note."""
    model = state.get(model_id)
    if model is None:
        return "(a widget: run the notebook to see it)"
    children = [state.get(str(child).removeprefix("IPY_MODEL_"), {}) for child in model["state"].get("children", [])]
    if [child.get("model_name") for child in children] == _TQDM_PARTS:
        label, bar, counts = (child["state"] for child in children)
        done = (bar.get("value") or 0) / bar["max"] if bar.get("max") else 0.0
        filled = min(10, max(0, round(10 * done)))
        text = f"{label.get('value', '')}|{'█' * filled}{' ' * (10 - filled)}|{counts.get('value', '')}"
        return html.unescape(text).replace("\u2007", " ")
    controls, todo = [], list(children)
    while todo:  # the controls' labels, in order, however deeply the layout nests them
        child = todo.pop(0)
        if child.get("state", {}).get("description"):
            controls.append(child["state"]["description"])
        todo[:0] = [state.get(str(c).removeprefix("IPY_MODEL_"), {}) for c in child.get("state", {}).get("children", [])]
    named = f" ({', '.join(controls)})" if controls else ""
    return f"(an interactive widget{named}: run the notebook to use it)"


def static_widget_text(nb: nbformat.NotebookNode) -> int:
    """Give every widget output a text fallback that tells the truth without a kernel; return how many.

    A widget's saved ``text/plain`` is what it looked like when first displayed: a tqdm bar
    at " 0%|", an ``interact`` as "interactive(children=(...". GitHub and other renderers
    without widget support show exactly that. The execution stores each widget's final
    state in the notebook's metadata; from it a progress bar gets its last line
    ("desc: 100%|██████████| 30/30 [...]") and any other widget a short note.
    """
    state = nb.metadata.get("widgets", {}).get(_WIDGET_STATE, {}).get("state", {})
    changed = 0
    for cell in nb.cells:
        for output in cell.get("outputs", []):
            view = output.get("data", {}).get(_WIDGET_VIEW)
            if view and "model_id" in view:
                output["data"]["text/plain"] = _widget_text(view["model_id"], state)
                changed += 1
    return changed


_OUTPUT_PROBLEMS = {
    "an absolute path of the machine": re.compile(r"/root/|/home/|/tmp/|/work/|/Users/|site-packages|[A-Z]:\\Users\\"),
    "an ANSI escape sequence": re.compile(r"\x1b"),
    "a progress bar frozen at 0%": re.compile(r"(?:^|[\s:])0%\|", re.MULTILINE),
    'a widget saved as "interactive(children=..."': re.compile(r"interactive\(children="),
}


def _output_texts(output) -> list[str]:
    texts = [output.get("text", "")] if output.get("output_type") == "stream" else []
    texts += [value for key, value in output.get("data", {}).items()
              if key.startswith("text/") and isinstance(value, str)]
    texts += [output.get("evalue", ""), *output.get("traceback", [])]
    return [t if isinstance(t, str) else "".join(t) for t in texts]


def output_problems(nb: nbformat.NotebookNode, name: str = "notebook") -> list[str]:
    """What a reader without a kernel should not see in saved outputs, one line per finding.

    Absolute paths of the machine that ran it, ANSI escape sequences (raw on GitHub), progress
    bars frozen at 0% and widgets saved as their ``repr``.
    """
    problems = []
    for index, cell in enumerate(nb.cells):
        for output in cell.get("outputs", []) if cell.cell_type == "code" else []:
            for text in _output_texts(output):
                for what, pattern in _OUTPUT_PROBLEMS.items():
                    match = pattern.search(text)
                    if match:
                        around = text[max(0, match.start() - 30): match.end() + 30].replace("\n", " ")
                        problems.append(f"{name} cell {index}: {what}: ...{around!r}...")
    return problems
