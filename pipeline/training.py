"""The training loop: phases, their loaders, the optimizer and one epoch, shared by `train` and `lr_find`.

Not a stage: `python -m pipeline.stages.train` runs the phases (fastai's `fine_tune`: the head on cached
activations, then everything) with these pieces; `lr_find` sweeps the learning rate with the same loaders and model;
`pipeline.tools.plan` times a step of each phase to estimate the run.
"""

from __future__ import annotations

import functools
import logging
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import log_loss
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import BatchSampler, ConcatDataset, DataLoader, Dataset, RandomSampler
from torchvision.datasets import ImageFolder
from tqdm import tqdm

from pipeline.distributed import ONE, Ranks, ShardedBatches, gather, shard
from pipeline.model import (
    CLASSES,
    WeightsError,
    autocast,
    build_model,
    freeze,
    frozen_names,
    param_groups,
    predict_logits,
    to_device,
    train_transform,
    trainable_module,
    trainable_part,
)
from pipeline.params.train import TrainParams

log = logging.getLogger("train")


def phases(p: TrainParams) -> list[tuple[str, int, float]]:
    """[(finetune, epochs, peak lr)]: fastai's fine_tune is the head alone first, then everything."""
    if p.finetune == "all" and p.head_epochs > 0:
        return [("head", p.head_epochs, p.head_lr), ("all", p.epochs, p.lr)]
    return [(p.finetune, p.epochs, p.lr)]


ETA_BATCHES = 20  # the first batches of a phase, timed for its estimate (the first few are slower: warm-up)


def train_steps(
    net,
    batches,
    optimizer,
    scheduler,
    device,
    desc="train",
    bf16: bool | None = None,
    epochs_left: int = 0,
    after_step=None,
    total: int | None = None,
) -> float:
    """The one training loop: a step of AdamW and its schedule per batch of `batches` (images, or cached activations
    for the trainable part); the mean loss over this rank's images. Every phase of `train`, its refit and `lr_find`
    step through it. `bf16`: under bf16 autocast (None: on CUDA only). `epochs_left` > 0: log an estimate of the
    phase's time, these epochs included, from the first ETA_BATCHES batches. `after_step(step, loss)` returning
    True stops the loop (lr_find's blow-up)."""
    total_loss, count = 0.0, 0
    total = len(batches) if total is None else total
    t0 = time.perf_counter()
    for step, (x, y) in enumerate(tqdm(batches, desc=desc, leave=False, mininterval=2, total=total)):
        if epochs_left and step == ETA_BATCHES and total > 2 * ETA_BATCHES:
            per_epoch = (time.perf_counter() - t0) / ETA_BATCHES * total
            log.info(
                "%s: ~%.1f min an epoch (from its first %d batches), ~%.0f min for the phase's %d epoch(s) left",
                desc, per_epoch / 60, ETA_BATCHES, per_epoch * epochs_left / 60, epochs_left,
            )  # fmt: skip
        x, y = to_device(x, device), y.to(device, non_blocking=True)
        # forward backward update
        with autocast(device, bf16):
            loss = F.cross_entropy(net(x).float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        value = loss.item()  # note: a CPU-GPU sync point, once per batch
        total_loss += value * len(y)
        count += len(y)
        if after_step is not None and after_step(step, value):
            break
    return total_loss / count


def validate(model, loader, device, bf16: bool | None = None, ranks: Ranks = ONE) -> dict:
    """Accuracy and log loss over the valid loader; with several ranks, each predicts its shard and all gather."""
    model = getattr(model, "_orig_mod", model)  # torch.compile's wrapper
    model = model.module if isinstance(model, DistributedDataParallel) else model  # no collectives: shards differ
    logits, y = gather(*predict_logits(model, loader, device, bf16=bf16), ranks)
    t = torch.from_numpy(logits)
    p_dog = torch.softmax(t, 1)[:, 1].numpy()
    # no separate valid cross-entropy: with two classes it is this log loss (the same curve drawn twice)
    return {
        "valid_accuracy": float(np.mean(logits.argmax(1) == y)),
        "valid_log_loss": float(log_loss(y, p_dog, labels=[0, 1])),
    }


class ArrayDataset(Dataset):
    """Rows of a (memory-mapped) activations array, with their labels."""

    def __init__(self, x: np.ndarray, y: np.ndarray):
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return torch.from_numpy(np.array(self.x[i])), int(self.y[i])  # np.array: copy out of the memmap


def make_loaders(
    data: Path,
    cache: dict | None,
    p: TrainParams,
    pre: dict,
    device: torch.device,
    gen: torch.Generator,
    fit_on: tuple[str, ...] = ("train",),
    ranks: Ranks = ONE,
) -> tuple[DataLoader, DataLoader]:
    """Loaders over the splits `fit_on` (shuffled, augmented) and over valid, of images or of cached activations
    when `cache` is given. Both paths shuffle with the same seeded generator `gen`, so they see the same batches.
    With several ranks, each takes its share of every global batch and its shard of valid."""
    if cache is not None:
        fit = [ArrayDataset(*cache[s]) for s in fit_on]
        valid_ds = ArrayDataset(*cache["valid"])
        workers = 0  # reading a memmap row is cheaper than handing it between processes
    else:
        fit = [ImageFolder(data / s, transform=train_transform(pre, p.augment, p.min_scale)) for s in fit_on]
        valid_ds = ImageFolder(data / "valid", transform=train_transform(pre, False))
        for ds in (*fit, valid_ds):
            if tuple(ds.classes) != CLASSES:
                raise SystemExit(f"{ds.root} holds {ds.classes}, expected {list(CLASSES)}: run 'dvc repro prepare'")
        workers = p.workers
    train_ds = fit[0] if len(fit) == 1 else ConcatDataset(fit)
    if min(len(train_ds), len(valid_ds)) < ranks.world:
        raise SystemExit(
            f"{len(train_ds)} training and {len(valid_ds)} validation images for {ranks.world} processes: each needs "
            "at least one of each; lower train.nproc"
        )
    # no persistent_workers: fresh workers each epoch draw their seeds from `gen`, whose state the checkpoint
    # keeps, so a resumed run augments exactly as an uninterrupted one (persistent ones seed once, at start)
    kw = dict(num_workers=workers, pin_memory=device.type == "cuda")
    if cache is None and 0 < p.epoch_images < len(train_ds):  # a new draw of epoch_images each epoch, no repeats
        order = RandomSampler(train_ds, num_samples=p.epoch_images, generator=gen)
    else:
        order = RandomSampler(train_ds, generator=gen)  # as shuffle=True draws it
    drop_last = len(train_ds) > p.batch_size
    if ranks.joined:  # the 1-process run's batches, this rank's share of each; its own augmentations
        batching = dict(batch_sampler=ShardedBatches(BatchSampler(order, p.batch_size, drop_last), ranks))
        batching["worker_init_fn"] = functools.partial(seed_rank, p.seed, ranks.rank)
    else:
        batching = dict(sampler=order, batch_size=p.batch_size, drop_last=drop_last)
    return (
        DataLoader(train_ds, **batching, generator=gen, **kw),  # valid's loader draws nothing from gen
        DataLoader(shard(valid_ds, ranks), batch_size=p.batch_size, shuffle=False, **kw),
    )


def fresh_model(p: TrainParams, device: torch.device, ranks: Ranks = ONE) -> nn.Module:
    """The arch with `train.weights` and a new head, the same for the same seed (random weights come from it); then
    each rank but rank 0 draws its own dropout masks and augmentations (`seed_rank`)."""
    torch.manual_seed(p.seed)
    try:
        model = build_model(p.arch, p.weights)
        # an impossible train.finetune (dense without a dense block) or train.frozen_groups (no body left to train)
        trainable_module(model, p.finetune), frozen_names(model, p.finetune, p.frozen_groups)
    except WeightsError as e:  # offline without the ImageNet file, a bad train.weights path, or the above
        raise SystemExit(str(e)) from None
    seed_rank(p.seed, ranks.rank)
    return model.to(device, memory_format=torch.channels_last)


def seed_rank(seed: int, rank: int, worker: int | None = None) -> None:
    """Rank `rank` > 0 (and its DataLoader workers) draw from their own seeds, rank 0 as a 1-process run does."""
    if rank:
        base = seed if worker is None else torch.initial_seed()  # a worker's: the loader's base seed + its number
        torch.manual_seed((base + 1_000_003 * rank) % 2**63)


def make_optimizer(model: nn.Module, p: TrainParams, finetune: str, lr: float, steps: int):
    """AdamW over what `finetune` trains (freezing the rest) and its one-cycle schedule over `steps`."""
    groups = param_groups(model, finetune, lr, p.body_lr_factor, p.frozen_groups)
    optimizer = torch.optim.AdamW(groups, lr=lr, weight_decay=p.weight_decay)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=[g["lr"] for g in groups], total_steps=steps, pct_start=p.warmup, anneal_strategy="cos"
    )
    return optimizer, scheduler


def trains_on_cache(finetune: str, cached: bool) -> bool:
    """Whether a phase that trains `finetune` runs on the cached activations, when there are any (`cached`): the
    cache stops where the head or dense phase trains; fine_tune's unfrozen phase runs on images."""
    return cached and finetune != "all"


def serves_cache(loader: DataLoader) -> bool:
    """Whether a loader of `phase_setup` serves cached activations (else images)."""
    return isinstance(loader.dataset, ArrayDataset)


def phase_setup(
    model: nn.Module,
    finetune: str,
    data: Path,
    cache: dict | None,
    p: TrainParams,
    pre: dict,
    device: torch.device,
    gen: torch.Generator,
    fit_on: tuple[str, ...] = ("train",),
    compiled: bool = False,
    ranks: Ranks = ONE,
) -> tuple[DataLoader, DataLoader, nn.Module]:
    """(train loader, valid loader, the module a step runs) for a phase that trains what `finetune` names: on the
    cached activations when the cache stops where that phase trains (the head, the dense block), so the module is
    the model's trainable part; on images otherwise (fine_tune's unfrozen phase), the whole model. Every phase of
    `train`, its refit and `lr_find` set up alike. With several ranks, the module is wrapped in DDP: its gradients
    are averaged over the ranks at every step."""
    on_cache = trains_on_cache(finetune, cache is not None)
    train_loader, valid_loader = make_loaders(data, cache if on_cache else None, p, pre, device, gen, fit_on, ranks)
    net = trainable_part(model, finetune) if on_cache else model
    if ranks.joined and device.type == "cuda" and not p.freeze_bn:  # BatchNorm statistics over the global batch
        from timm.layers import convert_sync_batchnorm  # torch's, and timm's BatchNormAct2d kept with its activation

        net = convert_sync_batchnorm(net)  # (gloo has no SyncBatchNorm: on CPU each rank normalises its share)
    if ranks.joined:  # what trains set first: DDP averages the gradients of the parameters that require them now
        freeze(model, finetune, p.frozen_groups)
        net = DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None)
    if compiled:
        net = torch.compile(net)  # compiles at the first batch (inductor: needs a C++ compiler on CPU)
    return train_loader, valid_loader, net
