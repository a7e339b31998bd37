"""Set keys of params.yaml from the command line, keeping its comments and layout (as `dvc exp run -S` does).

`python -m pipeline.tools.setparams params.yaml fetch.source=demo train.lr=0.01 ...` (run by `make demo`). Not a
stage: `make demo` uses it to put back the demo's values of the keys `make repro` overrides, when
params.yaml still holds a real run's values (`fetch.source` other than `demo`), so the demo always runs
offline on the demo data. Each value is parsed as YAML (`0.01` a number, `none` a string); an unknown
key is an error, checked against the typed config of its stage.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml
from ruamel.yaml import YAML

from pipeline import config
from pipeline.params import evaluate, export, fetch, package, predict, prepare, serve, train

SECTIONS = {
    "fetch": fetch.FetchParams,
    "prepare": prepare.PrepareParams,
    "train": train.TrainParams,
    "features": train.FeaturesParams,
    "evaluate": evaluate.EvaluateParams,
    "export": export.ExportParams,
    "predict": predict.PredictParams,
    "blend": evaluate.BlendParams,
    "package": package.PackageParams,
    "serve": serve.ServeParams,
}


def set_params(path: Path, assignments: list[str]) -> list[str]:
    """Write `key.sub=value` assignments into the YAML file at `path`; returns the keys whose value changed."""
    rt = YAML()  # round-trip: comments and key order survive
    data = rt.load(path.read_text())
    changed = []
    for assignment in assignments:
        key, sep, text = assignment.partition("=")
        if not sep:
            raise SystemExit(f"'{assignment}' is not KEY=VALUE")
        *parents, leaf = key.split(".")
        node = data
        for part in parents:
            node = node.get(part) if hasattr(node, "get") else None
        if node is None or leaf not in node:
            raise SystemExit(f"{path} has no key {key}")
        value = yaml.safe_load(text)
        if node[leaf] != value:
            node[leaf] = value
            changed.append(key)
    with open(path, "w") as f:
        rt.dump(data, f)
    for section, cls in SECTIONS.items():  # the result must still load into the typed config
        config.load_params(cls, section, path)
    for member in train.member_names(path):
        train.load_member(member, path)
    return changed


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Set keys of params.yaml, keeping its comments.")
    parser.add_argument("params", type=Path)
    parser.add_argument("assignments", nargs="+", help="dotted.key=value")
    parser.add_argument("--unless", help="key=value: change nothing when the file already has this value")
    args = parser.parse_args(argv)
    if args.unless:
        key, _, text = args.unless.partition("=")
        node = yaml.safe_load(args.params.read_text())
        for part in key.split("."):
            node = node[part]
        if node == yaml.safe_load(text):
            return
    changed = set_params(args.params, args.assignments)
    if changed:
        print(f"{args.params}: set {', '.join(changed)} back to the demo's values", file=sys.stderr)


if __name__ == "__main__":
    main()
