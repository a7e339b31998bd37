"""Peak memory of the API worker under concurrent oversized and malformed uploads (issue 13, items 1 and 2).

`python bench/upload_memory.py [--uploads 16] [--mb 300]` from the project root after `dvc repro` writes
bench/results/upload_memory_cpu.json. The model `dvc repro package` serves is imported into a temporary
BENTOML_HOME by the package stage and `bentoml serve` runs on 127.0.0.1 with the `serve` section of params.yaml
(as bench/load_test.py does, with its `--onnx`, `--metrics` and `--blend`). Each case sends
`--uploads` requests of `--mb` MB at once, each body made on the fly from one 1 MiB block (the client holds
none of it) over a raw socket, so the answer is read while the body is still going out, as a server that
refuses early allows:

- declared: one file part, with Content-Length (a server can refuse it before reading);
- chunked: one file part, chunked (no length: refused only while reading);
- chunked_batch: parts of serve.max_bytes - 1 KiB each (every one under the per-image limit), chunked;
- wrong_boundary: one file part, chunked, Content-Type says boundary=zzz and the body uses another.

Per case: the answers' statuses and seconds, and the API worker's peak RSS over the case (its VmHWM, reset
before each case through /proc/PID/clear_refs: Linux only) and its RSS 5 s after, against its RSS before.
A watchdog ends the server if the machine's available memory falls under --floor-gb (the code before the
fix held every body in memory), and the case says so.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from the project root

from load_test import package_args, package_model  # noqa: E402

from pipeline.files import atomic_write_text  # noqa: E402
from serving.smoke import api_worker, free_port, proc_status, start, stop, wait_ready  # noqa: E402

MIB = 1 << 20
BOUNDARY = "b0undary"


def available_bytes() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    raise KeyError("MemAvailable not in /proc/meminfo")


def part_head(name: str, filename: str) -> bytes:
    return (
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="{name}"; filename="{filename}"\r\n'
        "Content-Type: image/jpeg\r\n\r\n"
    ).encode()


def body_parts(field: str, total: int, part_size: int):
    """(bytes, ...) pieces of a multipart body of about `total` bytes in parts of `part_size`, never held whole."""
    block = os.urandom(MIB)
    sent, i = 0, 0
    while sent < total:
        size = min(part_size, total - sent)
        yield part_head(field, f"{i}.jpg")
        for offset in range(0, size, MIB):
            yield block[: min(MIB, size - offset)]
        yield b"\r\n"
        sent, i = sent + size, i + 1
    yield f"--{BOUNDARY}--\r\n".encode()


def body_length(field: str, total: int, part_size: int) -> int:
    return sum(len(piece) for piece in body_parts(field, total, part_size))


async def upload(port: int, path: str, content_type: str, pieces, length: int | None) -> tuple[str, float]:
    """POST the pieces (chunked when `length` is None) and read the answer while they go out: (status, seconds)."""
    t0 = time.perf_counter()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    framing = f"Content-Length: {length}" if length is not None else "Transfer-Encoding: chunked"
    writer.write(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: {content_type}\r\n{framing}\r\n\r\n".encode())

    async def send() -> None:
        try:
            for piece in pieces:
                writer.write(piece if length is not None else b"%x\r\n%s\r\n" % (len(piece), piece))
                await writer.drain()
            if length is None:
                writer.write(b"0\r\n\r\n")
                await writer.drain()
        except (ConnectionResetError, BrokenPipeError):  # the server answered and closed: nothing more to send
            pass

    sender = asyncio.create_task(send())
    try:
        status_line = await asyncio.wait_for(reader.readline(), timeout=300)
        status = status_line.split()[1].decode() if status_line else "closed"
    except ConnectionResetError:
        status = "reset"
    except TimeoutError:
        status = "timeout"
    seconds = time.perf_counter() - t0
    sender.cancel()
    writer.close()
    return status, round(seconds, 2)


def case_requests(name: str, uploads: int, total: int, max_bytes: int, port: int):
    ctype = f"multipart/form-data; boundary={BOUNDARY}"
    if name == "declared":
        length = body_length("images", total, total)
        return [
            upload(port, "/classify_batch", ctype, body_parts("images", total, total), length) for _ in range(uploads)
        ]
    if name == "chunked":
        return [
            upload(port, "/classify_batch", ctype, body_parts("images", total, total), None) for _ in range(uploads)
        ]
    if name == "chunked_batch":
        part = max_bytes - 1024
        return [upload(port, "/classify_batch", ctype, body_parts("images", total, part), None) for _ in range(uploads)]
    if name == "wrong_boundary":
        ctype = "multipart/form-data; boundary=zzz"
        return [
            upload(port, "/classify_batch", ctype, body_parts("images", total, total), None) for _ in range(uploads)
        ]
    raise ValueError(name)


async def run_case(name: str, uploads: int, total: int, max_bytes: int, port: int) -> list[tuple[str, float]]:
    return await asyncio.gather(*case_requests(name, uploads, total, max_bytes, port))


def measure(name: str, args, port: int, server: subprocess.Popen, max_bytes: int) -> dict:
    pid = api_worker(server.pid)
    rss0 = proc_status(pid, "VmRSS")
    Path(f"/proc/{pid}/clear_refs").write_text("5")  # VmHWM := VmRSS now: the peak over this case alone
    stop_watch, killed = threading.Event(), []

    def watchdog() -> None:  # end the server before it takes the machine's memory (the unfixed service would)
        while not stop_watch.wait(0.2):
            if available_bytes() < args.floor_gb * 2**30:
                killed.append(proc_status(pid, "VmRSS"))
                os.killpg(server.pid, signal.SIGKILL)
                return

    threading.Thread(target=watchdog, daemon=True).start()
    t0 = time.perf_counter()
    answers = asyncio.run(run_case(name, args.uploads, args.mb * MIB, max_bytes, port))
    stop_watch.set()
    result = {"statuses": sorted({s for s, _ in answers}), "answer_s_max": max(s for _, s in answers)}
    result["answer_s_median"] = sorted(s for _, s in answers)[len(answers) // 2]
    result["case_s"] = round(time.perf_counter() - t0, 2)
    if killed:
        result.update(killed_at_available_gb=args.floor_gb, api_rss_mb_when_killed=round(killed[0] / MIB))
        return result
    peak = proc_status(pid, "VmHWM")
    time.sleep(5)
    result.update(
        api_rss_before_mb=round(rss0 / MIB),
        api_peak_rise_mb=round((peak - rss0) / MIB),
        api_rss_after_5s_rise_mb=round((proc_status(pid, "VmRSS") - rss0) / MIB),
    )
    return result


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--onnx", type=Path, default=Path("models/onnx"), help="export's folder, or one model's")
    parser.add_argument("--metrics", type=Path, help="default metrics/members; with one model's --onnx, its own")
    parser.add_argument("--blend", type=Path, default=Path("metrics/blend.json"), help="names the best member")
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--uploads", type=int, default=16, help="concurrent uploads per case")
    parser.add_argument("--mb", type=int, default=300, help="MiB per upload")
    parser.add_argument("--cases", default="declared,chunked,chunked_batch,wrong_boundary")
    parser.add_argument("--floor-gb", type=float, default=4.0, help="end the server below this much free memory")
    parser.add_argument("--label", default="", help="a note stored with the figures (e.g. which code ran)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "upload_memory_cpu.json")
    args = parser.parse_args(argv)
    stage_args = package_args(args.onnx, args.metrics, args.blend)
    if not args.params.is_file():
        raise SystemExit(f"{args.params} not found: run from the project root, or pass --params")
    params = yaml.safe_load(args.params.read_text())
    serve = params["serve"]
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = package_model(stage_args, args.params, tmp / "bentoml")
        (tmp / "params.yaml").write_text(yaml.safe_dump(params))
        env = {**os.environ, "BENTOML_HOME": str(tmp / "bentoml"), "DOGSCATS_PARAMS": str(tmp / "params.yaml")}
        for name in args.cases.split(","):  # a fresh server per case: one case's leftovers do not blur the next
            port = free_port()
            with open(tmp / f"serve-{name}.log", "w") as log:
                server = start(port, env=env, log=log)
                try:
                    wait_ready(f"http://127.0.0.1:{port}", server)
                    results[name] = measure(name, args, port, server, serve["max_bytes"])
                finally:
                    stop(server)
            print(f"{name:>15}: {json.dumps(results[name])}", flush=True)
    cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    results.update(
        member=model["labels"].get("member"),  # None: one model's --onnx
        label=args.label,
        uploads=args.uploads,
        mb_each=args.mb,
        serve={k: serve[k] for k in ("max_bytes", "max_batch_images")},
        cpu=cpu,
        cpu_count=os.cpu_count(),
    )
    atomic_write_text(args.out, json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
