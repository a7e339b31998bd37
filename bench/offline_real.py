"""The real-photo proof: `make offline ZIP=...` from a fresh clone, per-stage times, and the submission scored once.

`python bench/offline_real.py` (defaults: ../shared/data/real-kaggle-4k and its test_labels.csv; see its README);
`--ensemble`: `make offline-ensemble` (Lite0 + Lite1 + Lite2) instead, each member and the blend scored.

1. `git clone` this repository's HEAD into a temporary folder (as a new user would) and run
   `make offline ZIP=<zip>` there, each output line timestamped: DVC's "Running stage" lines give per-stage
   wall times, and the whole run's time is measured against the issue's 45 minutes on 2 CPU cores.
2. Score `submissions/submission.csv` once against the test labels (the recipe was chosen on validation).
3. For the table beside it: the same model without TTA and calibration on the test images (PyTorch, the
   model's own preprocessing; after `train.refit`, also the weights chosen on validation), and a head-only
   run of the pipeline (`dvc exp run -S train.finetune=head ...` on the same cached features) scored the
   same way.

Writes bench/results/offline_real.json with the CPU model and instruction set.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.metrics import log_loss

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data" / "real-kaggle-4k"


def cpu() -> dict:
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    name = re.search(r"model name\s*:\s*(.*)", info)
    flags = sorted(set(re.findall(r"\b(avx512_vnni|avx512f|avx2)\b", info)))
    return {"model": name[1] if name else platform.processor(), "flags": flags, "cores": os.cpu_count()}


def run_timed(cmd: list[str], cwd: Path, log_path: Path) -> None:
    """Run `cmd` with the project's venv first on PATH (dvc stages call `python`), its output timestamped into
    `log_path` (seconds since the start, then the line)."""
    env = {**os.environ, "PATH": f"{cwd / '.venv' / 'bin'}{os.pathsep}{os.environ['PATH']}", "DVC_NO_ANALYTICS": "1"}
    # its own BentoML store: the default one (~/bentoml) is every checkout's, and `package` would change what they serve
    env["BENTOML_HOME"] = str(cwd.parent / f"{cwd.name}.bentoml")
    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for line in proc.stdout:
            log.write(f"{time.perf_counter() - t0:8.1f} {line}")
            log.flush()
        rc = proc.wait()
        log.write(f"{time.perf_counter() - t0:8.1f} (exit {rc})\n")
    if rc != 0:
        raise SystemExit(f"{' '.join(cmd)} failed (rc {rc}); see {log_path}")


def timings(log_path: Path) -> tuple[float, dict[str, float]]:
    """(total seconds, {stage: seconds}) from a `run_timed` log: each stage lasts until the next one starts."""
    starts, total = [], 0.0
    for line in log_path.read_text().splitlines():
        now = float(line[:8])
        total = max(total, now)
        stage = re.search(r"Running stage '([^']+)'", line)
        if stage:
            starts.append((stage[1], now))
    ends = [t for _, t in starts[1:]] + [total]
    return total, {name: round(end - start, 1) for (name, start), end in zip(starts, ends, strict=True)}


def score(p_dog: np.ndarray, y: np.ndarray) -> dict:
    return {"accuracy": float(np.mean((p_dog > 0.5) == (y == 1))), "log_loss": float(log_loss(y, p_dog, labels=[0, 1]))}


def score_submission(path: Path, labels: pd.DataFrame) -> dict:
    sub = pd.read_csv(path).merge(labels, on="id", suffixes=("", "_true"))
    return score(sub["label"].to_numpy(), sub["label_true"].to_numpy())


def member_test_scores(project: Path, labels: pd.DataFrame) -> dict:
    """Each member alone on the test images: its logits (predictions/test, written by predict) with its own
    calibration (what its evaluate chose on validation)."""
    sys.path.insert(0, str(project))
    from pipeline.calibration import Calibration

    scores = {}
    for path in sorted((project / "predictions" / "test").glob("*.csv")):
        z = pd.read_csv(path).merge(labels, on="id")
        chosen = project / "metrics" / "members" / path.stem / "evaluate.json"
        p = Calibration.chosen("evaluate", False, chosen).p_dog(z["logit"].to_numpy())
        scores[path.stem] = score(p, z["label"].to_numpy())
    return scores


def ensemble(project: Path, labels: pd.DataFrame, results: dict) -> dict:
    """The blend's and each member's validation and test figures."""
    blend = json.loads((project / "metrics" / "blend.json").read_text())
    results["valid"] = {"members": blend["members"], "blend": blend}
    results["test"] = {
        "members": member_test_scores(project, labels),
        "blend": score_submission(project / "submissions" / "submission.csv", labels),
    }
    results["predict"] = json.loads((project / "metrics" / "predict.json").read_text())
    return results


def plain_test_scores(project: Path, labels: pd.DataFrame, validated: bool = False) -> dict:
    """models/model.pt on the test images with no TTA and no calibration (PyTorch, its own preprocessing);
    `validated`: the weights chosen on validation rather than their refit on train + valid (train.refit)."""
    sys.path.insert(0, str(project))
    import torch
    from PIL import Image

    from pipeline.model import eval_transform, load_model

    model, meta = load_model(project / "models" / "model.pt", validated=validated)
    transform = eval_transform(meta)
    folder = project / "data" / "prepared" / "test" / "unknown"
    ids = labels["id"].to_numpy()
    p = []
    with torch.no_grad():
        for start in range(0, len(ids), 64):
            batch = ids[start : start + 64]
            x = torch.stack([transform(Image.open(folder / f"{i}.jpg").convert("RGB")) for i in batch])
            p.append(torch.softmax(model(x), 1)[:, 1].numpy())
    return score(np.concatenate(p).astype(np.float64), labels["label"].to_numpy())


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--zip", type=Path, default=SHARED / "dogs-vs-cats-redux-kernels-edition.zip")
    parser.add_argument("--labels", type=Path, default=SHARED / "test_labels.csv")
    parser.add_argument("--project", type=Path, help="run here instead of in a fresh clone (kept afterwards)")
    parser.add_argument("--reuse-log", action="store_true", help="with --project: read its offline.log, run nothing")
    parser.add_argument("--skip-head-only", action="store_true")
    parser.add_argument("--ensemble", action="store_true", help="make offline-ensemble: Lite0 + Lite1 + Lite2")
    parser.add_argument("--out", type=Path, help="default bench/results/offline_real.json (offline_ensemble.json)")
    args = parser.parse_args(argv)
    goal = "offline-ensemble" if args.ensemble else "offline"
    out = args.out or ROOT / "bench" / "results" / ("offline_ensemble.json" if args.ensemble else "offline_real.json")
    for path, what in ((args.zip, "--zip, the competition zip"), (args.labels, "--labels, its test labels")):
        if not path.exists():
            raise SystemExit(f"{path} not found: pass {what}, or put the shared real-kaggle-4k set at {SHARED}")
    labels = pd.read_csv(args.labels)
    project = args.project or Path(tempfile.mkdtemp(prefix="offline-real-")) / "project"
    if args.project is None:
        subprocess.run(["git", "clone", "--quiet", str(ROOT), str(project)], check=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=project, capture_output=True, text=True)
    results = {"cpu": cpu(), "commit": commit.stdout.strip(), "zip": str(args.zip), "project": str(project)}
    log_path = project / f"{goal}.log"
    print(f"running make {goal} in {project} (log: {log_path})", flush=True)
    if not args.reuse_log:
        run_timed(["make", goal, f"ZIP={args.zip.resolve()}"], project, log_path)
    total, stages = timings(log_path)
    results[f"make_{goal.replace('-', '_')}_seconds"] = round(total, 1)  # with installing the venv (pip)
    results["stage_seconds"] = stages
    if args.ensemble:
        ensemble(project, labels, results)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=2) + "\n")
        print(json.dumps({k: results[k] for k in ("stage_seconds", "valid", "test")}, indent=2))
        return
    metrics = json.loads((project / "metrics" / "members" / "model" / "evaluate.json").read_text())
    import torch

    ckpt = torch.load(project / "models" / "model.pt", map_location="cpu", weights_only=False)
    history, best = ckpt["history"], ckpt["best_epoch"]
    head_epochs = ckpt["params"]["head_epochs"]
    results["params"] = ckpt["params"]
    results["history"] = history
    results["best_epoch"] = best
    results["valid"] = {
        "head_only_last_head_epoch": {k: history[head_epochs - 1][k] for k in ("valid_accuracy", "valid_log_loss")},
        "fine_tuned_best_epoch": {k: history[best - 1][k] for k in ("valid_accuracy", "valid_log_loss")},
        "fine_tuned_tta_calibrated": metrics,
    }
    results["refit"] = ckpt.get("refit", False)  # the submitted model retrained on train + valid
    results["test"] = {
        "fine_tuned_plain": plain_test_scores(project, labels),
        **({"fine_tuned_plain_before_refit": plain_test_scores(project, labels, True)} if results["refit"] else {}),
        "fine_tuned_tta_calibrated": score_submission(project / "submissions" / "submission.csv", labels),
    }
    predict = json.loads((project / "metrics" / "predict.json").read_text())
    results["predict"] = predict
    if not args.skip_head_only:  # the lesson's recipe on the same cached features, through the same pipeline
        overrides = ["train.finetune=head", "train.augment=false", "train.epochs=8", "train.lr=0.002"]
        cmd = [str(project / ".venv" / "bin" / "dvc"), "exp", "run", *(a for o in overrides for a in ("-S", o))]
        run_timed(cmd, project, project / "head_only.log")
        t_head, head_stages = timings(project / "head_only.log")
        results["head_only"] = {
            "seconds": round(t_head, 1),
            "stage_seconds": head_stages,
            "valid": json.loads((project / "metrics" / "members" / "model" / "evaluate.json").read_text()),
            "test_tta_calibrated": score_submission(project / "submissions" / "submission.csv", labels),
        }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps({k: results[k] for k in ("make_offline_seconds", "stage_seconds", "valid", "test")}, indent=2))


if __name__ == "__main__":
    main()
