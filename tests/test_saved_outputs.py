"""Saved outputs read well without a kernel (GitHub, a rendered page): no machine paths, no ANSI
escapes, no progress bar frozen at 0%, no widget saved as its repr."""

import re

import nbformat
import pytest

from course import notebooks

SOLUTIONS = notebooks.solution_paths()
VIEW, STATE = "application/vnd.jupyter.widget-view+json", "application/vnd.jupyter.widget-state+json"


@pytest.mark.parametrize("path", SOLUTIONS, ids=lambda p: p.name)
def test_solution_outputs_have_nothing_a_reader_should_not_see(path):
    problems = notebooks.output_problems(nbformat.read(path, as_version=4), path.name)
    assert not problems, "\n".join(problems)


def notebook_with(*outputs):
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_markdown_cell("/home/me in markdown is not an output"),
                nbformat.v4.new_code_cell("x", outputs=list(outputs))]
    return nb


def stream(text, name="stdout"):
    return nbformat.v4.new_output("stream", name=name, text=text)


def display(text, **more):
    return nbformat.v4.new_output("display_data", data={"text/plain": text, **more})


@pytest.mark.parametrize(("output", "what"), [
    (stream("/work/main/.venv/lib/python3.11/site-packages/peft/x.py:1: UserWarning: hi", "stderr"), "absolute path"),
    (stream("saved to /tmp/tmpab12/adapter"), "absolute path"),
    (display("PosixPath('/root/.cache/peft-course')"), "absolute path"),
    (stream("two options, \x1b[1mdo those steps only if you trust the source\x1b[0m."), "ANSI"),
    (display("Loading weights:   0%|          | 0/272 [00:00<?, ?it/s]"), "frozen at 0%"),
    (stream("training:   0%|          | 0/30 [00:00<?, ?it/s]", "stderr"), "frozen at 0%"),
    (display("interactive(children=(IntSlider(value=8, description='r'), Output()), _dom_classes=...)"),
     "interactive(children="),
])
def test_each_problem_is_found(output, what):
    problems = notebooks.output_problems(notebook_with(output), "demo.ipynb")
    assert len(problems) == 1 and what in problems[0] and problems[0].startswith("demo.ipynb cell 1:")


def test_clean_outputs_pass():
    clean = notebook_with(stream("held-out accuracy 0.00 -> 0.73 (100% of the questions seen)"),
                          display("training: 100%|██████████| 30/30 [01:12<00:00,  2.4s/it]"),
                          display("10%|█         | 3/30"), stream("relative/path/adapter_config.json"))
    assert notebooks.output_problems(clean) == []


def widget_notebook():
    """Two widget outputs as nbclient saves them: a finished tqdm bar and an `interact`."""
    def model(name, **state):
        return {"model_name": name, "model_module": "@jupyter-widgets/controls", "model_module_version": "2.0.0",
                "state": state}

    state = {
        "bar": model("HBoxModel", children=["IPY_MODEL_label", "IPY_MODEL_progress", "IPY_MODEL_counts"]),
        "label": model("HTMLModel", value="training\u2007run:\u2007100%"),
        "progress": model("FloatProgressModel", value=30.0, max=30.0, bar_style="success"),
        "counts": model("HTMLModel", value="\u200730/30\u2007[01:12&lt;00:00,\u20072.40s/it]"),
        "ui": model("VBoxModel", children=["IPY_MODEL_r", "IPY_MODEL_out"]),
        "r": model("IntSliderModel", value=8, description="r"),
        "out": model("OutputModel", outputs=[]),
    }
    nb = notebook_with(display("training run:   0%|          | 0/30 [00:00<?, ?it/s]",
                               **{VIEW: {"model_id": "bar", "version_major": 2, "version_minor": 0}}),
                       display("interactive(children=(IntSlider(value=8, description='r'), Output()))",
                               **{VIEW: {"model_id": "ui", "version_major": 2, "version_minor": 0}}))
    nb.metadata["widgets"] = {STATE: {"state": state, "version_major": 2, "version_minor": 0}}
    return nb


def test_widget_outputs_get_their_final_state_as_text():
    nb = widget_notebook()
    assert len(notebooks.output_problems(nb)) == 2
    assert notebooks.static_widget_text(nb) == 2
    bar, ui = (o["data"]["text/plain"] for o in nb.cells[1].outputs)
    assert bar == "training run: 100%|██████████| 30/30 [01:12<00:00, 2.40s/it]"
    assert ui == "(an interactive widget (r): run the notebook to use it)"
    assert notebooks.output_problems(nb) == []


def test_execution_saves_no_frozen_progress_bar(tmp_path):
    """`notebooks run` goes through `execute`: a tqdm.auto bar comes back finished, not at 0%."""
    path = tmp_path / "bar.ipynb"
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell("from tqdm.auto import tqdm\nfor _ in tqdm(range(3), desc='demo'):\n    pass")]
    nbformat.write(nb, path)
    executed, _, error = notebooks.execute(path, timeout=120)
    assert error is None
    texts = [o["data"]["text/plain"] for o in executed.cells[0].outputs if "data" in o]
    assert any(t.startswith("demo: 100%|██████████| 3/3") for t in texts), texts
    assert notebooks.output_problems(executed) == []


@pytest.mark.parametrize("path", SOLUTIONS, ids=lambda p: p.name)
def test_one_rule_for_model_loading_bars_none_in_any_saved_output(path):
    """Issue 23: chapters 03-05 kept a dozen 'Loading weights' bars each while 06-07 hid them. Every set-up cell
    now turns transformers' bars off (`transformers.logging.disable_progress_bar()`), so none is saved."""
    nb = nbformat.read(path, as_version=4)
    setup = next(c.source for c in nb.cells if c.cell_type == "code" and "from course" in c.source)
    assert re.search(r"transformers\.(utils\.)?logging\.disable_progress_bar\(\)", setup), f"{path.name}: bars on"
    shown = [i for i, c in enumerate(nb.cells) if c.cell_type == "code" for o in c.get("outputs", [])
             if "Loading weights" in (o.get("text", "") or str(o.get("data", {}).get("text/plain", "")))]
    assert not shown, f"{path.name}: 'Loading weights' bars saved in cells {shown}"
