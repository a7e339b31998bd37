"""The lesson notebook, notebooks/lesson1.ipynb: git keeps it without outputs, its Kaggle recipe is `make repro`'s,
and it runs end to end on tiny demo data (nbclient, a real kernel, the real `dvc repro` and `bentoml serve`)."""

import ast
import re
import shutil

import nbformat
import pytest
from nbclient import NotebookClient

from tests.conftest import ROOT, TINY_DEMO, make_project, tool_env

NOTEBOOK = ROOT / "notebooks" / "lesson1.ipynb"
# the demo shrunk to a few dozen 48-80 px images and a 32 px VGG16: the whole notebook in a few minutes on 2 cores
TINY = {
    **TINY_DEMO,
    "train.image_size": 32,
    "train.epochs": 2,
    "train.batch_size": 8,
    "train.workers": 0,
    "lr_find.steps": 20,
    "evaluate.batch_size": 16,
    "evaluate.workers": 0,
    "evaluate.show_images": 4,
    "export.parity_images": 2,
    "export.variants": ["fp32"],
    "predict.batch_size": 5,
    "predict.workers": 2,
    "serve.max_latency_ms": 60000,  # a busy 2-core machine: never refuse the one request as too slow
}


def cell(nb, tag: str):
    """The code cell tagged `tag` (cell metadata `tags`)."""
    (found,) = [c for c in nb.cells if tag in c.metadata.get("tags", [])]
    return found


def shown(code_cell) -> str:
    """What a cell printed and displayed, as text."""
    outputs = code_cell.get("outputs", [])  # none for a markdown cell
    parts = [out.get("text", "") for out in outputs] + [out.get("data", {}).get("text/plain", "") for out in outputs]
    return "".join(parts)


def test_the_committed_notebook_has_no_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(c.outputs == [] and c.execution_count is None for c in code)


def test_the_notebooks_kaggle_recipe_is_make_repros():
    source = cell(nbformat.read(NOTEBOOK, as_version=4), "kaggle").source
    # the list the notebook assigns to KAGGLE_PARAMS
    (value,) = [
        n.value
        for n in ast.walk(ast.parse(source))
        if isinstance(n, ast.Assign) and ast.unparse(n.targets[0]) == "KAGGLE_PARAMS"
    ]
    makefile = (ROOT / "Makefile").read_text().replace("\\\n", " ")
    (line,) = re.findall(r"^KAGGLE_PARAMS = (.*)$", makefile, flags=re.M)
    # fetch.source is the mounted Kaggle folder in the notebook; the members override is dvc exp run -S syntax
    keys = [t for t in line.split() if re.match(r"[a-z_]+\.[\w.]+=", t) and not t.startswith("fetch.source=")]
    assert ast.literal_eval(value) == keys


@pytest.mark.slow
def test_the_notebook_runs_on_the_demo(tmp_path):
    project = make_project(tmp_path / "project", TINY)
    (project / "notebooks").mkdir()
    shutil.copy(NOTEBOOK, project / "notebooks")
    nb = nbformat.read(project / "notebooks" / NOTEBOOK.name, as_version=4)
    bentoml_home = tmp_path / "bentoml"  # the package stage's model store, which the served model is read from
    env = {**tool_env(), "BENTOML_HOME": str(bentoml_home), "DOGSCATS_PARAMS": str(project / "params.yaml")}
    env.pop("DOGSCATS_PROJECT", None)  # the notebook finds the project itself: its kernel starts in notebooks/
    client = NotebookClient(
        nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(project / "notebooks")}}
    )
    client.execute(env=env)  # a cell that raises fails the test with its traceback (CellExecutionError)
    nbformat.write(nb, tmp_path / "executed.ipynb")  # kept when the test fails: open it to see what the student sees

    assert str(project) in shown(nb.cells[1])  # the project found is the copy, not this checkout
    assert "Running stage 'train@model'" in "".join(shown(c) for c in nb.cells)  # dvc's output streamed
    assert "fetch.source: demo" in shown(cell(nb, "kaggle"))
    for tag in ("curves", "lr_find", "clip", "serve"):
        assert any("image/png" in out.get("data", {}) for out in cell(nb, tag).outputs), f"no picture in {tag}"
    for tag in ("top_losses", "most_uncertain"):
        (out,) = cell(nb, tag).outputs
        assert "image/png" in out["data"]
    confusion = shown(cell(nb, "confusion"))
    assert re.search(r"predicted cat\s+predicted dog\nactual cat\s+\d+\s+\d+\nactual dog\s+\d+\s+\d+", confusion), (
        confusion
    )
    submission = shown(cell(nb, "submission"))
    assert re.search(r"^\s+id\s+label\n0\s+1\s+0\.\d+", submission, flags=re.M), submission
    serve = shown(cell(nb, "serve"))
    assert re.search(r'POST /classify 1\.jpg -> 200 \{"label": ?"(cat|dog)", ?"p_dog": ?[0-9.]+', serve), serve
    assert "service stopped (exit code 0)" in serve
    shutil.rmtree(project)  # a VGG16, its checkpoint, ONNX and the store's copy: ~2 GB
    shutil.rmtree(bentoml_home)
