"""Load test of the real service: N concurrent clients POST real JPEGs to /classify, with and without batching.

`python bench/load_test.py [--onnx models/onnx] [--clients 16] [--seconds 30]` writes
bench/results/load_cpu.json shaped `{"batched": {"rps", "p50_ms", "p95_ms", "p99_ms", "errors",
"mean_batch", "idle_ms", "api_peak_rss_mb"}, "unbatched": {...}, "raw_ort_img_s": ..., "clients": N, "seconds": T}`.

The ONNX folder (all its variants) is imported into a temporary BENTOML_HOME, and `bentoml serve` runs twice
on 127.0.0.1 (serving/smoke.py's helpers): with the `serve` section of params.yaml (batched) and with
`serve.max_batch_size: 1` (unbatched), from a temporary params file (DOGSCATS_PARAMS). Locust (its CLI,
headless, users from bench/locustfile.py) drives the clients with no think time: a warm-up run, then the
measured run of `--seconds`. idle_ms: one client's /classify time (median of 3, one after another) before the
warm-up and `--idle-after` seconds after the measured run ends (issue 13: it stayed at the burst's queue
wait); api_peak_rss_mb: the API worker's peak RSS over the measured run (VmHWM, reset first: Linux).
mean_batch comes from the model service's `bentoml_service_adaptive_batch_size` histogram on /metrics, over
the same window. raw_ort_img_s is the same variant's ONNX Runtime session in this process at the service's
mean batch size, measured after the service stops (same machine, same run): the ceiling the service is
compared with. raw_ort_img_s_by_batch adds batch 1 and `serve.max_batch_size`, and batching_ceiling = the best
of those / batch 1: the most that batched/unbatched could reach on this machine if both ran at raw speed (the
raw session gets as many threads as the model service has in all). The clients share the machine with the
service, as they would in any one-box test. `--set KEY=VALUE` overrides a `serve` param for both runs (tuning:
e.g. `--set workers=2 --set threads=1 --out bench/results/tuning/workers2.json`).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import requests
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from the project root

from pipeline.config import ConfigError, from_dict  # noqa: E402
from pipeline.data import open_model, read_metadata  # noqa: E402
from pipeline.files import atomic_write_text  # noqa: E402
from pipeline.params.serve import ServeParams  # noqa: E402
from serving.smoke import api_worker, free_port, proc_status, start, stop, wait_ready  # noqa: E402

PHOTOS = ROOT.parent / "shared" / "data" / "real-photos-200px"
BATCH_METRIC = re.compile(r'^bentoml_service_adaptive_batch_size_(sum|count)\{[^}]*method_name="predict"[^}]*\} (\S+)$')


def import_model(onnx_dir: Path, home: Path, name: str) -> None:
    """The ONNX folder into the store at `home`, as the package stage does (in a child: bentoml reads
    BENTOML_HOME at import)."""
    code = (
        "import sys; from pathlib import Path; from pipeline.package import import_model; "
        "print(import_model(Path(sys.argv[1]), sys.argv[2], {}, {}).tag)"
    )
    env = {**os.environ, "BENTOML_HOME": str(home)}
    subprocess.run([sys.executable, "-c", code, str(onnx_dir), name], cwd=ROOT, env=env, check=True)


def batch_totals(url: str) -> tuple[float, float]:
    """(sum, count) of the model service's adaptive batch sizes so far, from Prometheus /metrics."""
    totals = {"sum": 0.0, "count": 0.0}
    for line in requests.get(f"{url}/metrics", timeout=10).text.splitlines():
        m = BATCH_METRIC.match(line)
        if m:
            totals[m.group(1)] += float(m.group(2))
    return totals["sum"], totals["count"]


def idle_ms(url: str, photo: Path, n: int = 3) -> float:
    """One client alone: the median of `n` /classify requests, one after another, in ms."""
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        r = requests.post(f"{url}/classify", files={"image": (photo.name, photo.read_bytes())}, timeout=120)
        r.raise_for_status()
        times.append(time.perf_counter() - t0)
    return round(1000 * float(np.median(times)), 1)


def run_locust(url: str, photos: Path, clients: int, seconds: float, csv_prefix: Path) -> None:
    """The locust CLI, headless: `clients` users of bench/locustfile.py for `seconds`; its CSVs at csv_prefix."""
    cmd = [
        str(Path(sys.executable).parent / "locust"), "-f", str(ROOT / "bench" / "locustfile.py"), "--headless",
        "--host", url, "-u", str(clients), "-r", str(clients), "-t", f"{seconds:.0f}s", "--csv", str(csv_prefix),
        "--only-summary", "--loglevel", "WARNING",
    ]  # fmt: skip
    env = {**os.environ, "LOAD_PHOTOS": str(photos)}
    done = subprocess.run(cmd, env=env, check=False, capture_output=True, text=True)  # 1 when a request failed
    if not Path(f"{csv_prefix}_stats.csv").is_file():  # locust itself failed: say why
        raise SystemExit(f"locust exited with {done.returncode} and wrote no figures:\n{done.stderr[-3000:]}")


def drive(url: str, api_pid: int, args, tmp: Path) -> dict:
    """Idle latency, a warm-up run, the measured run, idle latency after it; figures from locust's CSV, the
    service's /metrics and the API worker's /proc."""
    photo = sorted(args.photos.rglob("*.jpg"))[0]
    for _ in range(4):  # BentoML's batching trains its latency model on the first ~11 requests
        idle = {"before": idle_ms(url, photo)}
    run_locust(url, args.photos, args.clients, args.warmup, tmp / "warmup")
    batch0 = batch_totals(url)
    Path(f"/proc/{api_pid}/clear_refs").write_text("5")  # VmHWM := VmRSS: the peak of the measured run alone
    run_locust(url, args.photos, args.clients, args.seconds, tmp / "load")
    end = time.monotonic()
    api_peak = proc_status(api_pid, "VmHWM")
    batch1 = batch_totals(url)
    for after in args.idle_after:
        time.sleep(max(0.0, end + after - time.monotonic()))
        idle[f"after_{after:g}s"] = idle_ms(url, photo)
    with open(f"{tmp / 'load'}_stats.csv", newline="") as f:
        total = next(row for row in csv.DictReader(f) if row["Name"] == "Aggregated")
    calls = batch1[1] - batch0[1]
    return {
        "rps": round(float(total["Requests/s"]), 2),
        "p50_ms": float(total["50%"]),
        "p95_ms": float(total["95%"]),
        "p99_ms": float(total["99%"]),
        "errors": int(total["Failure Count"]),
        "requests": int(total["Request Count"]),
        "mean_batch": round((batch1[0] - batch0[0]) / calls, 2) if calls else 1.0,  # no histogram: unbatched
        "model_calls": calls,
        "idle_ms": idle,
        "api_peak_rss_mb": round(api_peak / 2**20),
    }


def serve_and_drive(params: dict, home: Path, tmp: Path, label: str, args) -> dict:
    (tmp / label).mkdir()
    path = tmp / f"params-{label}.yaml"
    path.write_text(yaml.safe_dump(params))
    env = {**os.environ, "BENTOML_HOME": str(home), "DOGSCATS_PARAMS": str(path)}
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with open(tmp / f"serve-{label}.log", "w") as log:
        proc = start(port, env=env, log=log)
        try:
            wait_ready(url, proc)
            figures = drive(url, api_worker(proc.pid), args, tmp / label)
        finally:
            stop(proc)
    retries = (tmp / f"serve-{label}.log").read_text().count("connection to the model service dropped")
    figures["retries"] = retries  # DogsVsCats.infer's retries of dropped dependency connections
    print(f"{label:>10}: {json.dumps(figures)}", flush=True)
    return figures


def raw_ort_img_s(onnx_dir: Path, params: ServeParams, batch: int, shape: tuple, seconds: float) -> tuple[float, str]:
    """images/s of the service's variant on one ONNX Runtime session at `batch`, after one warm-up call, with
    as many threads as the model service has in all (workers x threads; 0 = one per core)."""
    threads = params.threads * params.workers
    session, _, variant = open_model(onnx_dir, params.provider, params.variant, threads)
    x = np.random.default_rng(0).normal(size=(batch, *shape)).astype(np.float32)
    session.run(["probs"], {"image": x})
    calls, t0 = 0, time.perf_counter()
    while calls < 3 or time.perf_counter() - t0 < seconds:
        session.run(["probs"], {"image": x})
        calls += 1
    return batch * calls / (time.perf_counter() - t0), variant


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--onnx", type=Path, default=ROOT / "models" / "onnx", help="the ONNX folder export wrote")
    parser.add_argument("--photos", type=Path, default=PHOTOS, help="a folder of JPEGs (searched recursively)")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=30.0, help="measured window of each run")
    parser.add_argument("--warmup", type=float, default=10.0, help="load before the window, not measured")
    parser.add_argument(
        "--idle-after", type=lambda v: [float(x) for x in v.split(",")], default=[1.0, 5.0, 10.0],
        help="seconds after the measured run to time one idle client, e.g. 1,5,10",
    )  # fmt: skip
    parser.add_argument("--raw-seconds", type=float, default=10.0, help="timing of raw ONNX Runtime, per batch size")
    parser.add_argument("--params", type=Path, default=ROOT / "params.yaml")
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override a serve param, e.g. workers=2"
    )
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "load_cpu.json")
    args = parser.parse_args(argv)
    t_start = time.perf_counter()
    if not any(args.photos.rglob("*.jpg")):
        raise SystemExit(
            f"no JPEGs in {args.photos}: pass --photos DIR, any folder of photos (after `make demo`: "
            "data/prepared/valid)"
        )
    meta = read_metadata(args.onnx)
    params = yaml.safe_load(args.params.read_text())
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--set {item}: expected KEY=VALUE, e.g. --set workers=2")
        params["serve"][key] = yaml.safe_load(value)
    try:
        serve = from_dict(ServeParams, params["serve"], "serve")  # a typo fails here, not in the service
    except ConfigError as e:
        raise SystemExit(f"--set: {e}") from None
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        import_model(args.onnx, tmp / "bentoml", params["package"]["model_name"])
        results["batched"] = serve_and_drive(params, tmp / "bentoml", tmp, "batched", args)
        unbatched = {**params, "serve": {**params["serve"], "max_batch_size": 1}}
        results["unbatched"] = serve_and_drive(unbatched, tmp / "bentoml", tmp, "unbatched", args)
    batch = max(1, round(results["batched"]["mean_batch"] or 1))
    shape = (3, meta["image_size"], meta["image_size"])
    raw, variant = raw_ort_img_s(args.onnx, serve, batch, shape, args.raw_seconds)
    # what batching can gain at all on this machine: raw images/s at batch 1 and at the largest batch
    by_batch = {
        str(b): raw_ort_img_s(args.onnx, serve, b, shape, args.raw_seconds)[0] for b in {1, serve.max_batch_size}
    }
    by_batch[str(batch)] = raw
    results.update(
        {
            "raw_ort_img_s": round(raw, 2),
            "raw_ort_batch": batch,
            "raw_ort_img_s_by_batch": {b: round(v, 2) for b, v in sorted(by_batch.items(), key=lambda kv: int(kv[0]))},
            "batching_ceiling": round(max(by_batch.values()) / by_batch["1"], 2),  # best raw / raw at batch 1
            "variant": variant,
            "image_size": meta["image_size"],
            "clients": args.clients,
            "seconds": args.seconds,
            "serve": {k: params["serve"][k] for k in ("max_batch_size", "max_latency_ms", "threads", "workers")},
            "batched_vs_raw": round(results["batched"]["rps"] / raw, 3),
            "batched_vs_unbatched_rps": round(results["batched"]["rps"] / max(results["unbatched"]["rps"], 1e-9), 2),
            "cpu_count": os.cpu_count(),
            "locust": subprocess.run(
                [str(Path(sys.executable).parent / "locust"), "--version"], capture_output=True, text=True
            ).stdout.split()[1],
            "bench_seconds": round(time.perf_counter() - t_start, 1),
        }
    )
    atomic_write_text(args.out, json.dumps(results, indent=2) + "\n")
    print(
        f"{variant} {meta['image_size']} px, {args.clients} clients, {args.seconds:.0f} s: batched "
        f"{results['batched']['rps']} req/s (mean batch {results['batched']['mean_batch']}), unbatched "
        f"{results['unbatched']['rps']} req/s, raw ONNX Runtime {raw:.1f} images/s at batch {batch}: "
        f"{results['batched_vs_raw']:.0%} of raw, {results['batched_vs_unbatched_rps']}x unbatched (raw ONNX Runtime "
        f"gains at most {results['batching_ceiling']}x from batching here); wrote {args.out}"
    )


if __name__ == "__main__":
    main()
