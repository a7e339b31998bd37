"""Load test of the real service: N concurrent clients POST real JPEGs to /classify, with and without batching.

`python bench/load_test.py [--clients 16] [--seconds 30]` from the project root after `dvc repro` writes
bench/results/load_cpu.json shaped `{"batched": {"rps", "p50_ms", "p95_ms", "p99_ms", "errors", "mean_batch",
"idle_ms", "api_peak_rss_mb"}, "unbatched": {...}, "raw_ort_img_s": ..., "member": ..., "clients": N, "seconds": T}`.

The model served is the one `dvc repro package` serves: the package stage itself imports it (all its variants,
the calibration and TTA predict applies) into a temporary BENTOML_HOME, from `--onnx models/onnx`, `--metrics
metrics/members` and `--blend metrics/blend.json` (package.member, or the best member on validation); `--onnx`
of one model's folder (model.onnx inside) serves that model, with `--metrics` its own metrics folder. These
paths and `--params` are relative to the current folder: the project's. `bentoml serve` runs twice on 127.0.0.1
(serving/smoke.py's helpers): with the `serve` section of params.yaml (batched) and with `serve.max_batch_size: 1`
(unbatched), from a temporary params file (DOGSCATS_PARAMS). Locust (its CLI, headless, users from
bench/locustfile.py) drives the clients with no think time: a warm-up run, then the measured run of `--seconds`;
the photos are the shared real ones (../shared/data/real-photos-200px) where this checkout has them, else the
project's validation images (data/prepared/valid), or `--photos`. idle_ms: one client's /classify time (median
of 3, one after another) before the warm-up and `--idle-after` seconds after the measured run ends (issue 13: it
stayed at the burst's queue wait); api_peak_rss_mb: the API worker's peak RSS over the measured run (VmHWM, reset
first: Linux). mean_batch comes from the model service's `bentoml_service_adaptive_batch_size` histogram on
/metrics, over the same window. raw_ort_img_s is the same variant's ONNX Runtime session in this process at the
service's mean batch size, doing what the model service does per batch (flip TTA when the calibration has it),
measured after the service stops (same machine, same run): the ceiling the service is compared with.
raw_ort_img_s_by_batch adds batch 1 and `serve.max_batch_size`, and batching_ceiling = the best of those / batch
1: the most that batched/unbatched could reach on this machine if both ran at raw speed (the raw session gets as
many threads as the model service has in all). The clients share the machine with the service, as they would in
any one-box test. `--set KEY=VALUE` overrides a `serve` param for both runs (tuning: e.g. `--set workers=2 --set
threads=1 --out bench/results/tuning/workers2.json`).

Hostile traffic (issue 24), on the batched service after its measured run, `"hostile": {"made_up_paths":
{...}, "idle_connections": {...}}`: `--made-up-paths N` (10,000) GETs to random paths, with /metrics' size and
render time and the API worker's RSS before and after (BentoML labelled every path once: 21 MB after 5,000);
then `--idle-connections N` (10,000) connections opened and left silent, with the API worker's open files and
RSS while they are held and once `serve.header_timeout_s` has passed, and one /classify's time while they are
held (it got no answer at all before the connection bound). 0 skips either.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import resource
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import requests
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from the project root

from pipeline.config import ConfigError, from_dict  # noqa: E402
from pipeline.contract import ModelContract  # noqa: E402
from pipeline.data import MODEL_FILE, open_model  # noqa: E402
from pipeline.files import atomic_write_text  # noqa: E402
from pipeline.params.serve import ServeParams  # noqa: E402
from serving.smoke import api_worker, free_port, proc_status, start, stop, wait_ready  # noqa: E402

PHOTOS = ROOT.parent / "shared" / "data" / "real-photos-200px"
PROJECT_PHOTOS = Path("data") / "prepared" / "valid"  # where the shared photos are absent: the project's own
BATCH_METRIC = re.compile(r'^bentoml_service_adaptive_batch_size_(sum|count)\{[^}]*method_name="predict"[^}]*\} (\S+)$')


def package_args(onnx: Path, metrics: Path | None, blend: Path) -> list[str]:
    """The package stage's arguments for `--onnx`: the folder of the members' folders (as dvc.yaml passes it:
    package.member or the best member is served), or one model's own folder with its own metrics folder."""
    if not onnx.is_dir():
        raise SystemExit(f"{onnx} not found: run 'dvc repro' first, or pass --onnx, the ONNX folder export wrote")
    if (onnx / MODEL_FILE).is_file():  # one model's folder: no member to choose
        if metrics is None:
            raise SystemExit(f"--onnx {onnx} is one model's folder: pass --metrics, its own (metrics/members/<member>)")
        return ["--onnx", str(onnx.resolve()), "--metrics", str(metrics.resolve())]
    metrics = metrics or Path("metrics") / "members"
    return ["--onnx", str(onnx.resolve()), "--metrics", str(metrics.resolve()), "--blend", str(blend.resolve())]


def package_model(stage_args: list[str], params: Path, home: Path) -> dict:
    """The package stage run into the store at `home` (in a child: bentoml reads BENTOML_HOME at import), as
    `dvc repro package` runs it: {"path", "labels", "metadata"} of the model stored, the calibration included."""
    code = (
        "import json, sys, bentoml; from pipeline.stages import package; package.main(sys.argv[2:]); "
        "m = bentoml.models.get(json.loads(open(sys.argv[1]).read())['tag']); "
        "print(json.dumps({'path': m.path, 'labels': m.info.labels, 'metadata': m.info.metadata}))"
    )
    record = home / "package.json"
    cmd = [sys.executable, "-c", code, str(record), *stage_args, "--params", str(params.resolve())]
    cmd += ["--out", str(record)]
    env = {**os.environ, "BENTOML_HOME": str(home)}
    done = subprocess.run(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True)  # its log: to our stderr
    if done.returncode != 0:
        raise SystemExit(f"the package stage could not import the model (its message is above; exit {done.returncode})")
    return json.loads(done.stdout.splitlines()[-1])  # the child's last line: the model stored


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
    if int(total["Request Count"]) == 0:  # locust writes N/A for the percentiles
        raise SystemExit(f"no request completed in the measured {args.seconds:g} s: raise --seconds")
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


def open_files(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def metrics_size(url: str) -> tuple[int, float]:
    """(bytes, seconds) of one GET /metrics."""
    t0 = time.perf_counter()
    r = requests.get(f"{url}/metrics", timeout=300)
    r.raise_for_status()
    return len(r.content), time.perf_counter() - t0


def made_up_paths(url: str, api_pid: int, n: int) -> dict:
    """`n` GETs to random paths (8 clients, keep-alive): /metrics and the API worker before and after."""
    before, before_s = metrics_size(url)
    rss0 = proc_status(api_pid, "VmRSS")

    def get(count: int) -> dict:
        statuses: dict = {}
        with requests.Session() as session:
            for _ in range(count):
                code = session.get(f"{url}/{uuid.uuid4().hex}/{uuid.uuid4().hex[:8]}", timeout=30).status_code
                statuses[code] = statuses.get(code, 0) + 1
        return statuses

    t0 = time.perf_counter()
    with ThreadPoolExecutor(8) as pool:
        parts = list(pool.map(get, [n // 8 + (i < n % 8) for i in range(8)]))
    seconds = time.perf_counter() - t0
    after, after_s = metrics_size(url)
    statuses = {str(k): sum(p.get(k, 0) for p in parts) for k in sorted({k for p in parts for k in p})}
    return {
        "requests": n,
        "seconds": round(seconds, 1),
        "statuses": statuses,
        "metrics_bytes_before": before,
        "metrics_bytes_after": after,
        "metrics_render_s_before": round(before_s, 3),
        "metrics_render_s_after": round(after_s, 3),
        "api_rss_mb_before": round(rss0 / 2**20),
        "api_rss_mb_after": round(proc_status(api_pid, "VmRSS") / 2**20),
    }


def timed_classify(url: str, photo: Path) -> dict:
    """One /classify: its status (or "closed" when the service closed the connection unanswered) and time."""
    t0 = time.perf_counter()
    try:
        status = requests.post(f"{url}/classify", files={"image": (photo.name, photo.read_bytes())}, timeout=120)
        status = status.status_code
    except requests.ConnectionError:
        status = "closed"
    return {"status": status, "ms": round(1000 * (time.perf_counter() - t0), 1)}


def idle_connections(url: str, port: int, api_pid: int, n: int, header_timeout_s: float, photo: Path) -> dict:
    """`n` connections opened and left silent; the API worker while they are held and after the header timeout,
    and one /classify while they are held and one after."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < n + 256:
        if hard != resource.RLIM_INFINITY and hard < n + 256:
            raise SystemExit(f"--idle-connections {n}: this process may open {hard} files at most (ulimit -Hn)")
        resource.setrlimit(resource.RLIMIT_NOFILE, (n + 256, hard))
    files0, rss0 = open_files(api_pid), proc_status(api_pid, "VmRSS")
    socks, refused = [], 0
    t0 = time.perf_counter()
    try:
        for _ in range(n):
            s = socket.socket()
            s.settimeout(10)
            try:
                s.connect(("127.0.0.1", port))
            except OSError:  # the listen backlog is full: the kernel refuses (or times out) the rest
                s.close()
                refused += 1
                continue
            socks.append(s)
        opened_s = time.perf_counter() - t0
        time.sleep(1.0)
        held = {"api_open_files": open_files(api_pid), "api_rss_mb": round(proc_status(api_pid, "VmRSS") / 2**20)}
        classify = timed_classify(url, photo)
        time.sleep(max(0.0, header_timeout_s + 2 - (time.perf_counter() - t0 - opened_s)))  # after the last opened
        after = {"api_open_files": open_files(api_pid), "api_rss_mb": round(proc_status(api_pid, "VmRSS") / 2**20)}
        after_classify = timed_classify(url, photo)
    finally:
        for s in socks:
            s.close()
    return {
        "connections": n,
        "connected": len(socks),
        "refused_by_kernel": refused,
        "open_s": round(opened_s, 1),
        "api_open_files_before": files0,
        "api_rss_mb_before": round(rss0 / 2**20),
        "held": held,
        "classify_while_held": classify,  # past twice serve.max_connections a new connection is closed at once
        f"after_{header_timeout_s + 2:g}s": after,
        "classify_after": after_classify,
    }


def hostile(url: str, port: int, api_pid: int, params: dict, args) -> dict:
    figures = {}
    if args.made_up_paths:
        figures["made_up_paths"] = made_up_paths(url, api_pid, args.made_up_paths)
        print(f"made-up paths: {json.dumps(figures['made_up_paths'])}", flush=True)
    if args.idle_connections:
        photo = sorted(args.photos.rglob("*.jpg"))[0]
        timeout = float(params["serve"]["header_timeout_s"])
        figures["idle_connections"] = idle_connections(url, port, api_pid, args.idle_connections, timeout, photo)
        print(f"idle connections: {json.dumps(figures['idle_connections'])}", flush=True)
    return figures


def serve_and_drive(params: dict, home: Path, tmp: Path, label: str, args, hostile_too: bool = False) -> dict:
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
            api_pid = api_worker(proc.pid)
            figures = drive(url, api_pid, args, tmp / label)
            if hostile_too:
                figures["hostile"] = hostile(url, port, api_pid, params, args)
        finally:
            stop(proc)
    retries = (tmp / f"serve-{label}.log").read_text().count("connection to the model service dropped")
    figures["retries"] = retries  # DogsVsCats.infer's retries of dropped dependency connections
    print(f"{label:>10}: {json.dumps(figures)}", flush=True)
    return figures


def raw_ort_img_s(model_dir: Path, params: ServeParams, contract: ModelContract, batch: int, seconds: float
                  ) -> tuple[float, str]:  # fmt: skip
    """images/s of the service's variant on one ONNX Runtime session at `batch`, doing what the model service does
    per batch (`ModelContract.predict`: flip TTA doubles the images run), after one warm-up call, with as many
    threads as the model service has in all (workers x threads; 0 = one per core)."""
    threads = params.threads * params.workers
    session, _, variant = open_model(model_dir, params.provider, params.variant, threads)
    size = contract.image_size
    x = np.random.default_rng(0).normal(size=(batch, 3, size, size)).astype(np.float32)
    contract.predict(session, x)
    calls, t0 = 0, time.perf_counter()
    while calls < 3 or time.perf_counter() - t0 < seconds:
        contract.predict(session, x)
        calls += 1
    return batch * calls / (time.perf_counter() - t0), variant


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--onnx", type=Path, default=Path("models/onnx"), help="export's folder, or one model's")
    parser.add_argument("--metrics", type=Path, help="default metrics/members; with one model's --onnx, its own")
    parser.add_argument("--blend", type=Path, default=Path("metrics/blend.json"), help="names the best member")
    parser.add_argument("--photos", type=Path, help=f"a folder of JPEGs (recursively); default {PHOTOS} if present")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=30.0, help="measured window of each run")
    parser.add_argument("--warmup", type=float, default=10.0, help="load before the window, not measured")
    parser.add_argument(
        "--idle-after", type=lambda v: [float(x) for x in v.split(",")], default=[1.0, 5.0, 10.0],
        help="seconds after the measured run to time one idle client, e.g. 1,5,10",
    )  # fmt: skip
    parser.add_argument("--raw-seconds", type=float, default=10.0, help="timing of raw ONNX Runtime, per batch size")
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--made-up-paths", type=int, default=10_000, help="GETs to random paths afterwards (0: none)")
    parser.add_argument("--idle-connections", type=int, default=10_000, help="silent connections afterwards (0: none)")
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override a serve param, e.g. workers=2"
    )
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "load_cpu.json")
    args = parser.parse_args(argv)
    t_start = time.perf_counter()
    args.photos = args.photos or (PHOTOS if PHOTOS.is_dir() else PROJECT_PHOTOS)
    if not any(args.photos.rglob("*.jpg")):
        raise SystemExit(
            f"no JPEGs in {args.photos}: pass --photos DIR, any folder of photos (after `dvc repro`: "
            "data/prepared/valid)"
        )
    stage_args = package_args(args.onnx, args.metrics, args.blend)
    if not args.params.is_file():
        raise SystemExit(f"{args.params} not found: run from the project root, or pass --params")
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
        model = package_model(stage_args, args.params, tmp / "bentoml")
        contract = ModelContract.from_record(model["metadata"], model["path"])
        calibration = contract.calibration
        results["batched"] = serve_and_drive(params, tmp / "bentoml", tmp, "batched", args, hostile_too=True)
        unbatched = {**params, "serve": {**params["serve"], "max_batch_size": 1}}
        results["unbatched"] = serve_and_drive(unbatched, tmp / "bentoml", tmp, "unbatched", args)
        batch = max(1, round(results["batched"]["mean_batch"] or 1))
        stored = Path(model["path"])  # the store's copy: the files the service loaded
        raw, variant = raw_ort_img_s(stored, serve, contract, batch, args.raw_seconds)
        # what batching can gain at all on this machine: raw images/s at batch 1 and at the largest batch
        by_batch = {
            str(b): raw_ort_img_s(stored, serve, contract, b, args.raw_seconds)[0] for b in {1, serve.max_batch_size}
        }
    by_batch[str(batch)] = raw
    results.update(
        {
            "member": model["labels"].get("member"),  # None: one model's --onnx
            "calibration": calibration.as_dict(),
            "raw_ort_img_s": round(raw, 2),
            "raw_ort_batch": batch,
            "raw_ort_img_s_by_batch": {b: round(v, 2) for b, v in sorted(by_batch.items(), key=lambda kv: int(kv[0]))},
            "batching_ceiling": round(max(by_batch.values()) / by_batch["1"], 2),  # best raw / raw at batch 1
            "variant": variant,
            "image_size": contract.image_size,
            "photos": str(args.photos),
            "clients": args.clients,
            "seconds": args.seconds,
            "serve": {k: params["serve"][k] for k in ("max_batch_size", "max_latency_ms", "threads", "workers")},
            "batched_vs_raw": round(results["batched"]["rps"] / raw, 3),
            "hostile": results["batched"].pop("hostile"),
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
        f"{results['member'] or args.onnx} ({variant}, {calibration.describe()}) {contract.image_size} px, "
        f"{args.clients} clients, {args.seconds:.0f} s: batched "
        f"{results['batched']['rps']} req/s (mean batch {results['batched']['mean_batch']}), unbatched "
        f"{results['unbatched']['rps']} req/s, raw ONNX Runtime {raw:.1f} images/s at batch {batch}: "
        f"{results['batched_vs_raw']:.0%} of raw, {results['batched_vs_unbatched_rps']}x unbatched (raw ONNX Runtime "
        f"gains at most {results['batching_ceiling']}x from batching here); wrote {args.out}"
    )


if __name__ == "__main__":
    main()
