"""Where the time, memory and disk go as the photos grow: `make offline` on 4,000, 10,000 and 22,500 photos.

`python bench/scale.py` (default: ../shared/data/real-kaggle-22k, all three sizes; `--sizes 4000` for one). For
each size, a kit in Kaggle's layout is cut from the 22k kit (cats and dogs in equal numbers, train and test in
the kit's own 20,000 : 2,500 proportion, the test labels beside it), this repository's HEAD is cloned into a
temporary folder and `make offline ZIP=<kit>` runs there with this checkout's venv (nothing installed). Measured:
each stage's wall time (DVC's "Running stage" lines), its peak memory sampled every second, two ways: the RSS of the
stage's process and its DataLoader workers summed (pages a forked worker shares with its parent count twice: an upper
bound) and their PSS summed (each shared page split among the processes that map it: what the stage holds), the
workspace and DVC cache on disk afterwards (the venv aside), and the submission scored once against the kit's test
labels. `--whole-test --sizes 2000`: 2,000 training photos, scored on the whole test set (the issue's small-data
target). Writes bench/results/scale.json (with the CPU and its instruction set) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from pathlib import Path

import pandas as pd
import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT))

from offline_real import cpu, score_submission, timings  # noqa: E402

from pipeline.model import cpu_flags  # noqa: E402

KIT = ROOT.parent / "shared" / "data" / "real-kaggle-22k"
ZIP_NAME = "dogs-vs-cats-redux-kernels-edition.zip"
PHOTO = re.compile(r"(?:.*/)?(cat|dog)\.(\d+)\.jpg$")


def cut_kit(source: Path, labels: Path, photos: int, dest: Path, whole_test: bool = False) -> tuple[Path, Path]:
    """A competition zip of `photos` photos cut from `source` (the same train : test proportion, half cats and half
    dogs in train, the first test ids), and its test labels; `source` itself when it has that many. `whole_test`:
    `photos` training photos and the whole test set."""
    with zipfile.ZipFile(source) as outer, outer.open("train.zip") as f, zipfile.ZipFile(f) as train:
        names = [n for n in train.namelist() if PHOTO.match(n)]
        n_test = len(pd.read_csv(labels))
        if photos >= len(names) + (0 if whole_test else n_test):
            return source, labels
        per_class = photos // 2 if whole_test else round(photos * len(names) / (len(names) + n_test) / 2)
        keep_test = n_test if whole_test else photos - 2 * per_class
        by_class = {"cat": [], "dog": []}
        for n in sorted(names, key=lambda n: int(PHOTO.match(n)[2])):
            by_class[PHOTO.match(n)[1]].append(n)
        dest.mkdir(parents=True, exist_ok=True)
        kit = dest / ZIP_NAME
        with zipfile.ZipFile(kit, "w", zipfile.ZIP_STORED) as out:
            out.writestr("train.zip", inner_zip(train, by_class["cat"][:per_class] + by_class["dog"][:per_class]))
            with outer.open("test.zip") as g, zipfile.ZipFile(g) as test:
                ids = sorted(int(Path(n).stem) for n in test.namelist() if n.endswith(".jpg"))[:keep_test]
                out.writestr("test.zip", inner_zip(test, [f"test/{i}.jpg" for i in ids]))
            out.writestr("sample_submission.csv", "id,label\n" + "".join(f"{i},0.5\n" for i in ids))
    truth = pd.read_csv(labels)
    truth[truth["id"].isin(ids)].to_csv(dest / "test_labels.csv", index=False)
    return kit, dest / "test_labels.csv"


def inner_zip(source: zipfile.ZipFile, names: list[str]) -> bytes:
    path = Path(tempfile.mkstemp(suffix=".zip")[1])
    try:
        with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as out:
            for n in names:
                out.writestr(n, source.read(n))
        return path.read_bytes()
    finally:
        path.unlink()


class PeakRss(threading.Thread):
    """Samples, every second, the memory of each pipeline stage under `pid` (`python -m pipeline.stages.<stage>` and its
    children, summed); `peaks` maps the stage's command (module and member) to its highest RSS sum, `pss_peaks` to its
    highest PSS sum, in bytes."""

    def __init__(self, pid: int):
        super().__init__(daemon=True)
        self.root, self.peaks, self.pss_peaks, self.done = psutil.Process(pid), {}, {}, threading.Event()

    def run(self) -> None:
        while not self.done.wait(1.0):
            try:
                procs = self.root.children(recursive=True)
            except psutil.NoSuchProcess:
                return
            for proc in procs:
                try:
                    cmd = proc.cmdline()
                    if "-m" not in cmd or not cmd[cmd.index("-m") + 1].startswith("pipeline."):
                        continue
                    stage = cmd[cmd.index("-m") + 1].removeprefix("pipeline.").removeprefix("stages.")
                    stage = stage.removeprefix("tools.")
                    if "--member" in cmd:
                        stage += f"@{cmd[cmd.index('--member') + 1]}"
                    tree = [proc, *proc.children(recursive=True)]
                    rss = sum(p.memory_info().rss for p in tree)
                    pss = sum(p.memory_full_info().pss for p in tree)  # /proc/<pid>/smaps_rollup
                except (psutil.NoSuchProcess, psutil.AccessDenied, ValueError, IndexError):
                    continue
                self.peaks[stage] = max(self.peaks.get(stage, 0), rss)
                self.pss_peaks[stage] = max(self.pss_peaks.get(stage, 0), pss)


def du(path: Path, skip: tuple[str, ...] = (), seen: set | None = None) -> int:
    """Bytes of the files under `path` (hard links once, and not again if already in `seen`), leaving out the
    top-level names in `skip`."""
    seen, total = set() if seen is None else seen, 0
    for top in path.iterdir():
        if top.name in skip:
            continue
        for f in [top] if top.is_file() else top.rglob("*"):
            if f.is_file() and not f.is_symlink():
                st = f.stat()
                if (st.st_dev, st.st_ino) not in seen:
                    seen.add((st.st_dev, st.st_ino))
                    total += st.st_blocks * 512
    return total


def run_make(project: Path, kit: Path, venv: Path, extra: list[str], log_path: Path) -> PeakRss:
    """`make offline ZIP=kit` in `project` with `venv`, timestamped into `log_path`; the stages' peak memory."""
    env = {**os.environ, "PATH": f"{venv / 'bin'}{os.pathsep}{os.environ['PATH']}", "DVC_NO_ANALYTICS": "1"}
    # its own BentoML store: the default one (~/bentoml) is every checkout's, and `package` would change what they serve
    env["BENTOML_HOME"] = str(project.parent / f"{project.name}.bentoml")
    cmd = ["make", "offline", f"ZIP={kit}", f"VENV={venv}", *extra]
    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=project, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        sampler = PeakRss(proc.pid)
        sampler.start()
        for line in proc.stdout:
            log.write(f"{time.perf_counter() - t0:8.1f} {line}")
            log.flush()
        rc = proc.wait()
        sampler.done.set()
        log.write(f"{time.perf_counter() - t0:8.1f} (exit {rc})\n")
    if rc != 0:
        raise SystemExit(f"make offline failed (rc {rc}); see {log_path}")
    return sampler


def one_size(photos: int, args, work: Path) -> dict:
    kit, labels = cut_kit(
        args.kit / ZIP_NAME, args.kit / "test_labels.csv", photos, work / f"kit-{photos}", args.whole_test
    )
    project = work / f"project-{photos}"
    subprocess.run(["git", "clone", "--quiet", str(ROOT), str(project)], check=True)
    # this checkout's venv, as installed: make's stamps stay newer than the clone's pyproject.toml
    os.utime(project / "pyproject.toml", (0, 0))
    (args.venv / ".offline").touch()
    log_path = work / f"offline-{photos}.log"
    print(f"{photos} photos: make offline in {project} (log: {log_path})", flush=True)
    memory = run_make(project, kit, args.venv, args.make_args, log_path)
    total, stages = timings(log_path)
    blend = json.loads((project / "metrics" / "blend.json").read_text())
    result = {
        "photos": photos,
        "sizes_count": "training photos, the test set whole" if args.whole_test else "train + test photos",
        "zip_bytes": kit.stat().st_size,
        "seconds": round(total, 1),
        "stage_seconds": stages,
        "stage_peak_rss_bytes": memory.peaks,
        "stage_peak_pss_bytes": memory.pss_peaks,
        "workspace_bytes": du(project, skip=(".dvc", ".venv", ".git")),
        "dvc_cache_bytes": du(project / ".dvc" / "cache") if (project / ".dvc" / "cache").exists() else 0,
        # both together, a file DVC hard-linked into the workspace counted once
        "disk_bytes": du(project, skip=(".venv", ".git")),
        "valid": {k: blend[k] for k in ("n", "accuracy", "log_loss", "log_loss_calibrated")},
        "test": {
            "n": len(pd.read_csv(labels)),
            **score_submission(project / "submissions" / "submission.csv", pd.read_csv(labels)),
        },  # fmt: skip
    }
    result["disk_vs_zip"] = result["disk_bytes"] / result["zip_bytes"]
    if not args.keep:
        shutil.rmtree(project)
        shutil.rmtree(project.parent / f"{project.name}.bentoml", ignore_errors=True)
    return result


def plot(results: dict, path: Path) -> None:
    """Each size's time by stage (stacked), its peak RSS and its disk: one SVG beside the JSON."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = results["runs"]
    photos = [r["photos"] for r in runs]
    stages = sorted({s for r in runs for s in r["stage_seconds"]}, key=lambda s: -runs[-1]["stage_seconds"].get(s, 0))
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4))
    bottom = [0.0] * len(runs)
    labels = [f"{n:,}" for n in photos]
    for stage in stages:
        minutes = [r["stage_seconds"].get(stage, 0) / 60 for r in runs]
        ax_t.bar(labels, minutes, bottom=bottom, label=stage)
        bottom = [b + m for b, m in zip(bottom, minutes, strict=True)]
    ax_t.set(xlabel="photos in the kit (train + test)", ylabel="minutes", title="make offline: time by stage")
    ax_t.legend(fontsize=7)
    gib = [max(r["stage_peak_rss_bytes"].values()) / 2**30 for r in runs]
    pss = [max(r.get("stage_peak_pss_bytes", {0: float("nan")}).values()) / 2**30 for r in runs]
    disk = [r["disk_bytes"] / 2**30 for r in runs]
    zips = [r["zip_bytes"] / 2**30 for r in runs]
    ax_m.plot(photos, gib, "o-", label="peak RSS of a stage (workers' shared pages counted twice)")
    ax_m.plot(photos, pss, "o--", label="peak PSS of a stage")
    ax_m.plot(photos, disk, "s-", label="workspace + DVC cache")
    ax_m.plot(photos, [4 * z for z in zips], "k:", label="4 x the zip (the bound)")
    ax_m.set(xlabel="photos", ylabel="GiB", title="memory and disk", ylim=(0, None))
    ax_m.legend(fontsize=7)
    cpu_name = f"{results['cpu']['model']}, {results['cpu']['cores']} cores, {' '.join(results['cpu']['flags'])}"
    fig.suptitle(cpu_name, fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kit", type=Path, default=KIT, help="a folder with the competition zip and test_labels.csv")
    parser.add_argument("--sizes", type=int, nargs="+", default=[4000, 10000, 22500], help="photos, train + test")
    parser.add_argument("--whole-test", action="store_true", help="--sizes count training photos; the test set whole")
    parser.add_argument("--venv", type=Path, default=ROOT / ".venv", help="a venv with the project installed")
    parser.add_argument("--make-args", nargs="*", default=[], help="more make variables, e.g. OFFLINE_VALID=1000")
    parser.add_argument("--work", type=Path, help="where the kits and clones go (default: a temporary folder)")
    parser.add_argument("--keep", action="store_true", help="keep each clone (several GB at 22,500 photos)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "scale.json")
    parser.add_argument("--plot-only", action="store_true", help="redraw the plot (scale.svg) from --out")
    args = parser.parse_args(argv)
    if args.plot_only:
        plot(json.loads(args.out.read_text()), args.out.with_suffix(".svg"))
        return
    for need in (args.kit / ZIP_NAME, args.kit / "test_labels.csv"):
        if not need.exists():
            raise SystemExit(f"{need} not found: pass --kit, the folder of the shared real-kaggle-22k set")
    if not (args.venv / ".installed").exists():
        raise SystemExit(f"{args.venv} has no installed project: run 'make install' first, or pass --venv")
    work = args.work or Path(tempfile.mkdtemp(prefix="scale-"))
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    results = {"cpu": {**cpu(), "flags": list(cpu_flags())}, "commit": commit.stdout.strip(),
               "make_args": args.make_args, "runs": []}  # fmt: skip
    if args.out.exists():  # other sizes measured earlier with the same make args are kept, each with its commit
        earlier = json.loads(args.out.read_text())
        if earlier.get("make_args") == args.make_args:
            results["runs"] = [r for r in earlier["runs"] if r["photos"] not in args.sizes]
    for photos in args.sizes:
        results["runs"].append({"commit": results["commit"], **one_size(photos, args, work)})
        results["runs"].sort(key=lambda r: r["photos"])
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2) + "\n")
        plot(results, args.out.with_suffix(".svg"))
    for r in results["runs"]:
        peak = max(r["stage_peak_rss_bytes"].values(), default=0) / 2**30
        pss = max(r.get("stage_peak_pss_bytes", {}).values(), default=float("nan")) / 2**30
        test = f"test {r['test']['accuracy']:.4f} / {r['test']['log_loss']:.4f}"
        print(f"{r['photos']:6d} photos: {r['seconds'] / 60:5.1f} min, peak RSS {peak:.1f} GiB (PSS {pss:.1f}), disk "
              f"{r['disk_vs_zip']:.1f}x the zip, {test}")  # fmt: skip


if __name__ == "__main__":
    main()
