"""The README's commands exist: every `make X` it names is a Makefile target, every file it links is there."""

import re

from tests.conftest import ROOT

README = (ROOT / "README.md").read_text()


def test_the_readme_is_read_in_five_minutes():
    assert len(README.splitlines()) <= 150


def test_every_make_target_the_readme_names_exists():
    targets = set(re.findall(r"(?m)^([a-z][\w-]*):", (ROOT / "Makefile").read_text()))
    named = set(re.findall(r"\bmake ([a-z][\w-]*)", README))
    assert {"demo", "test", "repro", "offline", "offline-ensemble", "serve", "plots", "submit"} <= named
    assert named <= targets, named - targets


def test_every_local_link_and_script_the_readme_names_exists():
    links = re.findall(r"\]\(((?!https?:)[^)#]+)\)", README)
    scripts = re.findall(r"python (bench/\w+\.py)", README)
    assert links and scripts
    for path in [*links, *scripts, "notebooks/lesson1.ipynb"]:
        assert (ROOT / path).exists(), path
