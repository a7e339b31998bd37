"""Smoke check of the served model: start `bentoml serve`, classify one photo over HTTP, stop.

`python -m serving.smoke data/prepared/test/unknown/1.jpg` (the last step of `make demo`). Uses the
latest `dogs-vs-cats` model in the BentoML store (`dvc repro package` puts it there), a free port on
127.0.0.1, and stops the service with SIGTERM, as `make serve` would be stopped. The helpers here
(`start`, `wait_ready`, `stop`) are also what the tests use to run the real server.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parents[1]
SERVICE = "serving.service:DogsVsCats"
# on SIGTERM, requests in flight get this long before the workers end them: uvicorn's default waits for ever, and a
# /readyz waiting on a model service that cannot start never ends (issue 13: only SIGKILL stopped `make serve`)
GRACEFUL_SHUTDOWN_S = 20


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(port: int, env: dict | None = None, log=None, target: str = SERVICE, cwd: Path = ROOT) -> subprocess.Popen:
    """`bentoml serve` of `target` (the service in this checkout, or a built bento's tag) on 127.0.0.1:`port`, in its
    own process group (the API and the model service)."""
    bentoml = Path(sys.executable).parent / "bentoml"
    cmd = [str(bentoml), "serve", target, "--host", "127.0.0.1", "--port", str(port)]
    cmd += ["--timeout-graceful-shutdown", str(GRACEFUL_SHUTDOWN_S)]
    return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def wait_ready(url: str, proc: subprocess.Popen, seconds: float = 180) -> None:
    """Return once GET /readyz answers 200; raise if the server exits or `seconds` pass first."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"bentoml serve exited with code {proc.returncode} before it was ready")
        try:
            if requests.get(f"{url}/readyz", timeout=2).status_code == 200:
                return
        except (requests.ConnectionError, requests.Timeout):  # not listening yet, or still starting up
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{url}/readyz did not answer 200 within {seconds:.0f} s")


def stop(proc: subprocess.Popen, seconds: float = 60) -> int:
    """SIGTERM the server's process group and wait; kill it if it does not stop in time. Returns its exit code
    (also when it had already exited by itself)."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:  # the whole group is gone already: a server that failed to start
        return proc.wait()
    try:
        return proc.wait(timeout=seconds)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise


def api_worker(server_pid: int) -> int:
    """The pid of the API service's worker: the child of `bentoml serve` started with --service-name DogsVsCats."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            cmdline = (stat.parent / "cmdline").read_bytes()
        except (FileNotFoundError, ProcessLookupError):  # a process that ended while we looked
            continue
        if ppid == server_pid and b"--service-name\0DogsVsCats\0" in cmdline:
            return int(stat.parent.name)
    raise RuntimeError(f"no DogsVsCats worker under pid {server_pid}")


def proc_status(pid: int, key: str) -> int:
    """A VmRSS/VmHWM line of /proc/PID/status, in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(f"{key} not in /proc/{pid}/status")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Serve the model, classify one photo over HTTP, stop.")
    parser.add_argument("image", type=Path)
    args = parser.parse_args(argv)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    print(f"starting {SERVICE} on {url} ...", flush=True)
    with tempfile.TemporaryFile("w+") as log:
        proc = start(port, log=log)
        try:
            wait_ready(url, proc)
            with open(args.image, "rb") as f:
                r = requests.post(f"{url}/classify", files={"image": (args.image.name, f)}, timeout=120)
            print(f"POST /classify {args.image} -> {r.status_code} {json.dumps(r.json())}")
            ok = r.status_code == 200
        except (RuntimeError, TimeoutError) as e:  # it exited, or never became ready
            print(f"{e}", flush=True)
            ok = False
        finally:
            code = stop(proc)
            print(f"service stopped (exit code {code})")
        if not ok:
            log.seek(0)
            print("the service's last log lines:\n" + "".join(log.readlines()[-40:]), file=sys.stderr)
            raise SystemExit(1)


if __name__ == "__main__":
    main()
