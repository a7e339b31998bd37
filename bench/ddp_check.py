"""1 process vs N under torchrun: the train stage's validation log loss per epoch and its time, on CPU (gloo) or CUDA
(NCCL), on the same params and the same global batch.

`python bench/ddp_check.py --device cuda --nproc 1 2 --torchrun` writes bench/results/ddp_<device>.json: for each
process count, the features and train stages run as `dvc repro` runs them (train.nproc > 1: under torchrun), and with
--torchrun also 1 process under torchrun (the DDP path in a world of 1: NCCL on one GPU); each run's validation log loss
per epoch, its seconds, and its largest difference from the 1-process run. The model: EfficientNet-Lite0 from random
weights, fastai's fine_tune (the head on cached activations, then everything, augmented), on a generated demo set.
The head epochs see the same global batches in any number of processes; the unfrozen epochs draw dropout masks and
augmentations per rank, so they differ by more than arithmetic. Needs no dvc or bentoml.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from the project root

from pipeline.demo import write_demo_zip  # noqa: E402
from pipeline.files import atomic_write_text  # noqa: E402
from pipeline.params.fetch import DemoParams  # noqa: E402
from pipeline.params.prepare import PrepareParams  # noqa: E402
from pipeline.stages.prepare import prepare  # noqa: E402


def stage(module: str, work: Path, data: Path, params: Path, torchrun: bool = False) -> None:
    """Run a stage as dvc.yaml does (or under torchrun with one process); stop with its log if it fails."""
    args = ["--data", str(data), "--params", str(params)]
    if module == "features":
        args += ["--out", str(work / "features")]
    else:
        args += ["--features", str(work / "features"), "--model", str(work / "model.pt")]
        args += ["--checkpoint", str(work / "ckpt.pt"), "--live", str(work / "live")]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=1"] if torchrun else [
        sys.executable]  # fmt: skip
    done = subprocess.run([*launcher, "-m", f"pipeline.stages.{module}", *args], cwd=ROOT, capture_output=True,
                          text=True)  # fmt: skip
    if done.returncode != 0:
        raise SystemExit(f"ddp_check: {module} failed ({' '.join(launcher)}):\n{done.stderr[-3000:]}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--nproc", type=int, nargs="+", default=[1, 2], help="process counts; 1 first: the reference")
    parser.add_argument("--torchrun", action="store_true", help="also 1 process under torchrun (DDP, a world of 1)")
    parser.add_argument("--per-class", type=int, default=40, help="generated training photos per class")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args(argv)
    if args.nproc[0] != 1:
        raise SystemExit("ddp_check: --nproc must start with 1, the run the others are compared with")
    if args.device == "cuda" and torch.cuda.device_count() < max(args.nproc):
        raise SystemExit(f"ddp_check: {max(args.nproc)} processes need as many GPUs; {torch.cuda.device_count()} seen")
    runs = [(f"{n}_process", n, False) for n in args.nproc] + ([("1_process_torchrun", 1, True)] * args.torchrun)
    results = {"device": args.device, "gpu": torch.cuda.get_device_name(0) if args.device == "cuda" else None,
               "torch": torch.__version__, "runs": {}}  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        demo = DemoParams(seed=7, train_per_class=args.per_class, test_count=2, min_side=48, max_side=96,
                          mislabel_fraction=0.05, hard_fraction=0.1)  # fmt: skip
        write_demo_zip(tmp / "c.zip", tmp / "labels.csv", demo)
        prepare(tmp / "c.zip", tmp / "prepared", PrepareParams(seed=1, valid_per_class=max(4, args.per_class // 5),
                valid_fraction=0.0, sample_train_per_class=2, sample_valid_per_class=2, max_pixels=1_000_000,
                workers=1))  # fmt: skip
        base = yaml.safe_load((ROOT / "params.yaml").read_text())
        for name, nproc, torchrun in runs:
            params = dict(base)
            params["train"] = {**base["train"], "arch": "efficientnet_lite0", "weights": "none", "finetune": "all",
                               "head_epochs": 2, "epochs": 2, "augment": True, "lr": 0.001, "workers": 0,
                               "image_size": args.image_size, "batch_size": args.batch_size, "device": args.device,
                               "nproc": nproc}  # fmt: skip
            work = tmp / name
            work.mkdir()
            (work / "params.yaml").write_text(yaml.safe_dump(params))
            t0 = time.perf_counter()
            stage("features", work, tmp / "prepared", work / "params.yaml", torchrun)
            stage("train", work, tmp / "prepared", work / "params.yaml", torchrun)
            history = torch.load(work / "model.pt", weights_only=False)["history"]
            results["runs"][name] = {"nproc": nproc, "torchrun": torchrun or nproc > 1,
                                     "seconds": round(time.perf_counter() - t0, 1),
                                     "valid_log_loss": [round(h["valid_log_loss"], 5) for h in history]}  # fmt: skip
    reference = results["runs"]["1_process"]["valid_log_loss"]
    for run in results["runs"].values():
        diffs = [abs(a - b) for a, b in zip(run["valid_log_loss"], reference, strict=True)]
        run["head_epochs_max_diff"], run["max_diff"] = round(max(diffs[:2]), 5), round(max(diffs), 5)
    out = args.out / f"ddp_{args.device}.json"
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, json.dumps(results, indent=2) + "\n")
    for name, run in results["runs"].items():
        print(f"{name:20} {run['seconds']:6.1f}s  valid log loss {run['valid_log_loss']}  (head epochs: "
              f"{run['head_epochs_max_diff']} from 1 process; all: {run['max_diff']})")  # fmt: skip
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
