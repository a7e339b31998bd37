"""dvc.yaml: each stage depends on exactly the code it runs, so a change reruns only the stages that run it.

The code a stage runs is its module and every `pipeline` module it imports, transitively (read from the source
with `ast`). A stage that lists less would not rerun when its code changes; one that lists more reruns for
nothing (before, every stage listed pipeline/config.py with every section's settings in it, so editing the
service's settings reran fetch, a Kaggle download, and everything after it).
"""

import ast
import re
from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT

STAGES = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


def module_path(name: str) -> Path:
    path = ROOT / Path(*name.split("."))
    return path.with_suffix(".py") if path.with_suffix(".py").exists() else path / "__init__.py"


def imported(name: str) -> set[str]:
    """The `pipeline` modules `name` imports (`from pipeline.params.train import X`, `from pipeline import data`)."""
    found = set()
    for node in ast.walk(ast.parse(module_path(name).read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "pipeline":
            for alias in node.names:  # `from pipeline import data` imports a module; `from pipeline.x import f` not
                sub = f"{node.module}.{alias.name}"
                found.add(sub if (ROOT / Path(*sub.split("."))).with_suffix(".py").exists() else node.module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "pipeline")
    return found


def code_of(module: str) -> set[str]:
    """Paths of the modules that running `python -m module` executes (package __init__ files aside)."""
    seen, todo = set(), [module]
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            todo.extend(imported(name))
    paths = {module_path(n).relative_to(ROOT).as_posix() for n in seen}
    return {p for p in paths if not p.endswith("__init__.py")}


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_each_stage_depends_on_exactly_the_code_it_runs(stage):
    spec = STAGES[stage].get("do", STAGES[stage])  # foreach stages: the template
    module = re.search(r"python -m (pipeline\.[\w.]+)", spec["cmd"])[1]
    listed = {d for d in spec["deps"] if d.startswith("pipeline/")}
    assert listed == code_of(module), f"{stage}: deps list {sorted(listed)}, it runs {sorted(code_of(module))}"


def test_no_stage_runs_the_service_settings():
    """The serve section (pipeline/params/serve.py) is read only by the service: editing it reruns no stage."""
    for spec in STAGES.values():
        deps = spec.get("do", spec)["deps"]
        assert "pipeline/params/serve.py" not in deps and not any(d.split("/")[0] == "serving" for d in deps)


def package_modules(folder: str) -> set[str]:
    return {f"{folder.replace('/', '.')}.{p.stem}" for p in (ROOT / folder).glob("*.py") if p.stem != "__init__"}


def test_the_layout_shows_the_pipeline_stages_above_the_library():
    """pipeline/stages/ holds one module per dvc.yaml entry and nothing else; a stage imports no other stage and no
    make-target helper (pipeline/tools/), and a helper no stage; the library (pipeline/*.py, pipeline/params/)
    imports neither: what two of them share lives in the library."""
    stages, tools = package_modules("pipeline/stages"), package_modules("pipeline/tools")
    run_by_dvc = {re.search(r"python -m (pipeline\.[\w.]+)", s.get("do", s)["cmd"])[1] for s in STAGES.values()}
    assert stages == run_by_dvc
    library = package_modules("pipeline") | package_modules("pipeline/params")
    assert library and tools and not library & (stages | tools)
    for stage in stages:
        assert not imported(stage) & (stages | tools), f"{stage} imports {sorted(imported(stage) & (stages | tools))}"
    for tool in tools:
        assert not imported(tool) & stages, f"{tool} imports the stage(s) {sorted(imported(tool) & stages)}"
    for module in library:
        wrong = {m for m in imported(module) if m.startswith(("pipeline.stages", "pipeline.tools"))}
        assert not wrong, f"the library module {module} imports {sorted(wrong)}"
    assert imported("pipeline.stages.blend") == {  # example: blend fits with the library, not with the evaluate stage
        "pipeline.config", "pipeline.files", "pipeline.params.evaluate", "pipeline.params.train", "pipeline.scoring"
    }  # fmt: skip
