"""Serving one member or the blend: batch-1 latency of each member's ONNX model and of all of them in turn.

`python bench/blend_latency.py [PROJECT] [--members lite0 lite1 lite2]`, PROJECT (default: the current folder) a
project after `dvc repro` (its models/onnx/<member>/ and a test image), e.g. where `make offline-ensemble` ran; the
members are by default those of its params.yaml. For each variant (fp32; int8 where export kept it for every
member) every member runs one image, interleaved so each sees the same load on the cores; the median of
`--rounds` (15). The blend's latency is the sum: the service would run the members one after another on the same
cores. Prints JSON with the CPU and writes it to `--out` (bench/results/blend_latency_cpu.json); issue 15 asks
whether the blend stays under 2x the single model's latency.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from the project root

from pipeline.contract import ModelContract  # noqa: E402
from pipeline.data import MODEL_FILE, load_image, make_session  # noqa: E402
from pipeline.files import atomic_write_text  # noqa: E402
from pipeline.params.train import member_names  # noqa: E402


def latencies(project: Path, members: list[str], variant: str, image: Path, rounds: int) -> dict[str, float]:
    """Median ms per member at batch 1, and of all members in turn."""
    runs = {}
    for member in members:
        onnx_dir = project / "models" / "onnx" / member
        contract = ModelContract.read(onnx_dir)
        session, _ = make_session(onnx_dir, "cpu", variant)
        x = contract.preprocess(load_image(image, 10**8))[None]
        runs[member] = lambda s=session, c=contract, x=x: c.probs(s, x)
    for run in runs.values():
        run()  # warm up
    times = {member: [] for member in runs}
    together = []
    for _ in range(rounds):
        total = 0.0
        for member, run in runs.items():
            t0 = time.perf_counter()
            run()
            times[member].append(time.perf_counter() - t0)
            total += times[member][-1]
        together.append(total)
    result = {member: round(1000 * statistics.median(t), 1) for member, t in times.items()}
    result["blend"] = round(1000 * statistics.median(together), 1)
    return result


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("project", type=Path, nargs="?", default=Path("."), help="default: the current folder")
    parser.add_argument("--members", nargs="+", help="default: the members of PROJECT/params.yaml")
    parser.add_argument("--rounds", type=int, default=15, help="timed rounds; the median is kept")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "blend_latency_cpu.json")
    args = parser.parse_args(argv)
    members = args.members or member_names(args.project / "params.yaml")
    for member in members:
        if not (args.project / "models" / "onnx" / member / MODEL_FILE).is_file():
            raise SystemExit(f"{args.project / 'models' / 'onnx' / member} has no {MODEL_FILE}: run 'dvc repro' there")
    images = sorted((args.project / "data" / "prepared" / "test" / "unknown").glob("*.jpg"))
    if not images:
        raise SystemExit(f"no test image in {args.project / 'data' / 'prepared' / 'test'}: run 'dvc repro' there")
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    flags = sorted({f for f in ("avx2", "avx512f", "avx512_vnni") if f" {f} " in info})
    out = {"cpu": {"flags": flags, "cores": os.cpu_count()}, "members": members, "rounds": args.rounds}
    for variant in ("fp32", "int8"):
        if all((args.project / "models" / "onnx" / m / "model.int8.onnx").exists() for m in members) or (
            variant == "fp32"
        ):
            out[variant] = latencies(args.project, members, variant, images[0], args.rounds)
            slowest = max(v for k, v in out[variant].items() if k != "blend")  # the kindest comparison for the blend
            out[variant]["blend_over_slowest_member"] = round(out[variant]["blend"] / slowest, 2)
    atomic_write_text(args.out, json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
