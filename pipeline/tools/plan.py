"""The plan of a pipeline run and about how long it will take, printed before it starts (a command, not a stage).

`python -m pipeline.tools.plan --params params.yaml [-S key=value ...]` (run by `make repro`, `make offline` and
`make offline-ensemble` before `dvc exp run`, with the same overrides, in dvc exp run -S's syntax). Prints the
images (counted in the competition zip's listing, nothing extracted), then each member's stages with their
phases and epochs and an estimate of each, from timing the first batches of the member's own model on this
machine (a training step and forward passes of random images at its size, batch and precision) and the decoding
of a few of the zip's own photos. It assumes that every stage runs (DVC may restore some from its cache) and
that nothing else loads the machine; read it as +-30%. During the run, each long loop has a tqdm bar with its
ETA, and train logs its phase's time after the first batches.
"""

from __future__ import annotations

import argparse
import io
import logging
import shutil
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image

from pipeline.config import load_params, setup_logging
from pipeline.data import preprocess
from pipeline.feature_cache import cache_applies, head_draw
from pipeline.model import (
    build_model,
    native_bf16,
    param_groups,
    pick_device,
    preprocessing,
    set_train_mode,
    use_bf16,
)
from pipeline.params.fetch import FetchParams
from pipeline.params.predict import PredictParams
from pipeline.params.prepare import PrepareParams
from pipeline.params.train import FeaturesParams, TrainParams, load_member, member_names
from pipeline.training import phases, trains_on_cache
from pipeline.tta import view_count

log = logging.getLogger("plan")
KAGGLE_COUNTS = (25_000, 12_500)  # the competition's train and test images, before a download is there to count


@dataclass(frozen=True)
class Counts:
    train: int  # images the model trains on
    valid: int  # the validation split
    test: int  # the test set, predicted


def count_images(fetch: FetchParams, prepare: PrepareParams) -> Counts:
    """The split's sizes, from the zip's listing (train.zip's and test.zip's members), the demo's recipe, or
    Kaggle's published counts."""
    if fetch.source == "demo":
        train, test = 2 * fetch.demo.train_per_class, fetch.demo.test_count
    elif fetch.source == "kaggle":
        train, test = KAGGLE_COUNTS
    else:
        source = Path(fetch.source)
        with open_competition(source) as outer:
            train, test = (count_jpegs(outer, name) for name in ("train.zip", "test.zip"))
    valid = min(2 * prepare.valid_size(train // 2), train)
    return Counts(train=train - valid, valid=valid, test=test)


def open_competition(source: Path):
    """The competition zip, or a folder holding its inner zips (as fetch accepts it), as something with .open."""
    if source.is_dir():
        return _Folder(source)
    if not source.is_file():
        raise SystemExit(f"fetch.source {source} does not exist: name the competition zip (ZIP=...)")
    return zipfile.ZipFile(source)


class _Folder:
    def __init__(self, root: Path):
        self.root = root

    def open(self, name: str):
        return open(self.root / name, "rb")

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        pass


def count_jpegs(outer, name: str) -> int:
    with outer.open(name) as f, zipfile.ZipFile(f) as inner:
        return sum(1 for n in inner.namelist() if n.lower().endswith(".jpg"))


def sample_photos(fetch: FetchParams, n: int = 16) -> list[bytes]:
    """A few of the competition's own JPEGs, to time decoding; none for the demo or before a Kaggle download."""
    if fetch.source in ("demo", "kaggle"):
        return []
    with open_competition(Path(fetch.source)) as outer, outer.open("train.zip") as f, zipfile.ZipFile(f) as inner:
        names = [x for x in inner.namelist() if x.lower().endswith(".jpg")][:n]
        return [inner.read(x) for x in names]


def decode_s(photos: list[bytes], pre: dict) -> float:
    """Seconds to decode and preprocess one photo (one core), as the loaders do; 5 ms when there is none to time."""
    if not photos:
        return 0.005
    t0 = time.perf_counter()
    for data in photos:
        with Image.open(io.BytesIO(data)) as img:
            preprocess(img.convert("RGB"), pre["image_size"], pre["resize_size"], pre["mean"], pre["std"],
                       pre["interpolation"])  # fmt: skip
    return (time.perf_counter() - t0) / len(photos)


def timed(step, calls: int = 2) -> float:
    """Seconds per call of `step`, after one warm-up call."""
    step()
    t0 = time.perf_counter()
    for _ in range(calls):
        step()
    return (time.perf_counter() - t0) / calls


def member_speeds(p: TrainParams, device: torch.device) -> dict[str, float]:
    """Seconds per image of this member's model: a training step of everything (what an unfrozen epoch does), a
    forward pass at train.precision (features, validation during training) and in fp32 (evaluate, export, predict)."""
    torch.manual_seed(p.seed)
    # random weights: the same compute as the trained ones, and nothing to download before the run
    model = build_model(p.arch, "none").to(device, memory_format=torch.channels_last)
    size = preprocessing(p.arch, p.image_size)["image_size"]
    bf16 = use_bf16(p.precision, device)
    x = torch.randn(p.batch_size, 3, size, size, device=device).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 2, (p.batch_size,), device=device)
    # what an unfrozen epoch trains: everything but the frozen layer groups
    optimizer = torch.optim.AdamW(param_groups(model, "all", 1e-6, 1.0, p.frozen_groups))

    def train_step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = F.cross_entropy(model(x).float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    def forward(enabled: bool):
        @torch.no_grad()
        def step() -> None:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled):
                model(x).float().sum().item()

        return step

    speeds = {}
    cached = cache_applies(p) is None
    if any(not trains_on_cache(finetune, cached) for finetune, _, _ in phases(p)):  # a phase trains on images
        set_train_mode(model, "all", p.freeze_bn, p.frozen_groups)
        speeds["train"] = timed(train_step) / p.batch_size
    model.eval()
    speeds["forward"] = timed(forward(bf16)) / p.batch_size
    speeds["forward_fp32"] = speeds["forward"] if not bf16 else timed(forward(False)) / p.batch_size
    return speeds


def member_plan(p: TrainParams, n: Counts, speeds: dict, decode: float, tta) -> list[tuple[str, str, float]]:
    """[(stage, what it does, estimated seconds)] for one member."""
    fwd, fwd32 = speeds["forward"] + decode, speeds["forward_fp32"] + decode
    views = view_count(tta)
    in_views = {1: "", 2: " + mirrors"}.get(views, f" + mirrors and closer crops ({views} views each)")
    plan = []
    if cache_applies(p) is None:
        cached = min(n.train, head_draw(p) or n.train) + n.valid
        plan.append(("features", f"{cached} images through the frozen body", cached * fwd))
    for finetune, epochs, lr in phases(p):
        if trains_on_cache(finetune, cache_applies(p) is None):
            plan.append(("train", f"{finetune}: {epochs} epochs at lr {lr:g} on cached activations", 2.0 + epochs))
        else:
            drawn = min(n.train, p.epoch_images or n.train)  # train.epoch_images: a draw of them each epoch
            per_epoch = drawn * (speeds["train"] + decode) + n.valid * fwd
            frozen = ""
            if finetune == "all" and p.frozen_groups:
                frozen = f", its first {p.frozen_groups} layer groups frozen"
            what = f"{finetune}{frozen}: {epochs} epochs at lr {lr:g} on {drawn} images, {per_epoch / 60:.1f} min each"
            plan.append(("train", what, epochs * per_epoch))
    if p.refit:
        plan.append(("train", "refit on train + valid", sum(s for st, _, s in plan if st == "train") * 1.2))
    per_image = fwd32 + (views - 1) * speeds["forward_fp32"]  # decoded once, then each view through the model
    plan.append(("evaluate", f"{n.valid} validation images{in_views}", n.valid * per_image))
    plan.append(("export", "ONNX, its parity check and int8 on the validation images", 20 + 2 * n.valid * fwd32))
    plan.append(("predict", f"{n.test} test images{in_views}", n.test * per_image))
    return plan


def apply_overrides(params: Path, overrides: list[str], work: Path) -> Path:
    """A copy of `params` with dvc exp run -S's overrides applied (DVC's own Hydra parser), so the plan is of the run
    about to start; the original is not touched."""
    copy = work / "params.yaml"
    shutil.copy(params, copy)
    if overrides:
        from dvc.utils.hydra import apply_overrides as dvc_apply  # DVC's, not ours: the same syntax and result

        dvc_apply(copy, overrides)
    return copy


def minutes(seconds: float) -> str:
    return f"{seconds / 60:5.1f} min"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Print the run's plan and an estimate of its time.")
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("-S", "--set", dest="overrides", action="append", default=[], help="as dvc exp run -S")
    args = parser.parse_args(argv)
    setup_logging()
    with tempfile.TemporaryDirectory() as tmp:
        params = apply_overrides(args.params, args.overrides, Path(tmp))
        fetch, prepare = load_params(FetchParams, "fetch", params), load_params(PrepareParams, "prepare", params)
        tta = load_params(PredictParams, "predict", params).tta
        load_params(FeaturesParams, "features", params)  # a typo fails here, before the run
        members = {m: load_member(m, params) for m in member_names(params)}
    n = count_images(fetch, prepare)
    photos = sample_photos(fetch)
    t_prepare = (n.train + n.valid + n.test) * decode_s(photos, preprocessing("vgg16", 224)) + 10
    lines = [f"the plan: {n.train} train, {n.valid} valid, {n.test} test images; {len(members)} member(s)"]
    total = 5 + t_prepare  # fetch, then prepare's decode check
    lines.append(f"  {'prepare':9s} {minutes(t_prepare)}  decode-check and split {n.train + n.valid + n.test} images")
    for name, p in members.items():
        device = pick_device(p.device)
        precision = "bf16 autocast" if use_bf16(p.precision, device) else "fp32"
        size = preprocessing(p.arch, p.image_size)["image_size"]
        native = device.type == "cpu" and native_bf16() and p.precision == "fp32"
        lines.append(f"  member {name}: {p.arch} at {size} px on {device}, {precision}"
                     f"{' (train.precision auto would use this CPU native bf16)' if native else ''}")  # fmt: skip
        speeds = member_speeds(p, device)
        decode = decode_s(photos, preprocessing(p.arch, p.image_size))
        for stage, what, seconds in member_plan(p, n, speeds, decode, tta):
            lines.append(f"    {stage:9s} {minutes(seconds)}  {what}")
            total += seconds
    if len(members) > 1:
        total += 10
        lines.append(f"  {'blend':9s} {minutes(10)}  the members' validation logits combined and calibrated")
    lines.append(f"estimated total: {total / 60:.0f} min (+-30%; stages DVC restores from its cache take seconds)")
    print("\n".join(lines), flush=True)


if __name__ == "__main__":
    main()
