"""Each stage module's docstring gives the command that runs it: the one in dvc.yaml, not an older one.

The example is the backquoted `python -m pipeline.stages.<module> ...` in the module's docstring (read with `ast`,
nothing imported). A `foreach` stage's command is compared as dvc.yaml runs it for the member `model`:
`${key}` is `model` and the other `${...}` are dvc.yaml's `vars`. Modules that no stage runs (pipeline/tools/)
are not checked.
"""

import ast
import re

import pytest
import yaml

from tests.conftest import ROOT

DVC = yaml.safe_load((ROOT / "dvc.yaml").read_text())
VARS = {k: v for table in DVC.get("vars", []) for k, v in table.items()}
MEMBER = "model"  # the member the examples spell out


def resolve(cmd: str) -> str:
    """A stage's cmd with its templating filled in for the member `model`, on one line."""
    cmd = re.sub(r"\$\{(\w+)\}", lambda m: MEMBER if m[1] == "key" else str(VARS[m[1]]), cmd)
    return " ".join(cmd.split())


def stage_commands() -> dict[str, list[tuple[str, str]]]:
    """module name -> [(stage, resolved cmd)] for every stage that runs `python -m pipeline.stages.<module>`."""
    found: dict[str, list[tuple[str, str]]] = {}
    for stage, spec in DVC["stages"].items():
        cmd = resolve(spec.get("do", spec)["cmd"])  # foreach stages: the template
        module = re.search(r"python -m pipeline\.stages\.(\w+)", cmd)
        if module:
            found.setdefault(module[1], []).append((stage, cmd))
    return found


def docstring_example(module: str) -> str | None:
    """The backquoted `python -m pipeline.stages.<module> ...` of the module's docstring, on one line; None if none."""
    doc = ast.get_docstring(ast.parse((ROOT / "pipeline" / "stages" / f"{module}.py").read_text())) or ""
    example = re.search(rf"`(python -m pipeline\.stages\.{module}\b[^`]*)`", doc)
    return " ".join(example[1].split()) if example else None


def flags(cmd: str) -> set[str]:
    return set(re.findall(r"(?<![\w-])--[\w-]+", cmd))


COMMANDS = stage_commands()
EXAMPLES = {p.stem: docstring_example(p.stem) for p in sorted((ROOT / "pipeline" / "stages").glob("*.py"))}
CHECKED = sorted(m for m, example in EXAMPLES.items() if example and m in COMMANDS)


def best_stage(module: str) -> tuple[str, str]:
    """Of the stages that run `module`, the one whose flags differ least from the docstring's example."""
    wanted = flags(EXAMPLES[module])
    return min(COMMANDS[module], key=lambda stage_cmd: len(flags(stage_cmd[1]) ^ wanted))


def test_the_stage_modules_are_checked():
    """The stages' modules all give their command (an example that moved out of the docstring is not checked)."""
    assert set(CHECKED) == set(COMMANDS) == {p.stem for p in (ROOT / "pipeline" / "stages").glob("[!_]*.py")}


@pytest.mark.parametrize("module", CHECKED)
def test_docstring_example_has_the_stage_flags(module):
    stage, cmd = best_stage(module)
    example = flags(EXAMPLES[module])
    missing, extra = sorted(flags(cmd) - example), sorted(example - flags(cmd))
    assert not missing and not extra, (
        f"pipeline/stages/{module}.py's docstring example differs from dvc.yaml's `{stage}` cmd: "
        f"missing {missing}, not in dvc.yaml {extra}"
    )


@pytest.mark.parametrize("module", CHECKED)
def test_docstring_example_is_the_stage_cmd(module):
    """The paths too: a foreach stage's cmd as it runs for the member `model`."""
    stage, cmd = best_stage(module)
    assert EXAMPLES[module] == cmd, f"pipeline/stages/{module}.py's docstring example is not dvc.yaml's `{stage}` cmd"
