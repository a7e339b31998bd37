"""Training in several processes under PyTorch's torchrun: the ranks, each rank's share of a batch, validation over
every image once, and the launch.

Not a stage: `train` with `train.nproc` (processes per host) or `train.nnodes` above 1 runs itself again under
`torchrun` (`--standalone` on one host, a c10d rendezvous at `train.rdzv_endpoint` across hosts). Every rank steps
through the same global batches a 1-process run does, each on its share, and DDP averages the gradients; validation
shards its images without padding and gathers them, so the log loss counts each image once. Rank 0 alone writes.
"""

from __future__ import annotations

import datetime
import logging
import os
import socket
import subprocess
import sys
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import BatchSampler, Dataset, Sampler, Subset

log = logging.getLogger("distributed")

TIMEOUT = datetime.timedelta(minutes=30)  # a collective waits this long for a rank (rank 0 saves checkpoints alone)


@dataclass(frozen=True)
class Ranks:
    """This process's place in the run: its rank among `world` processes, and on its host."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    joined: bool = False  # in torchrun's process group: DDP, sharded batches and gathers (also a world of 1)

    @property
    def main(self) -> bool:
        """The rank that writes the model, the checkpoint and the learning curves."""
        return self.rank == 0


ONE = Ranks()


def under_torchrun() -> bool:
    """Whether this process is one of torchrun's workers (torchrun sets these for each)."""
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ


def cpu_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def start(device: torch.device) -> Ranks:
    """Join the run torchrun started (gloo on CPU, NCCL on CUDA, one GPU per local rank), or ONE outside torchrun."""
    if not under_torchrun():
        return ONE
    env = os.environ
    ranks = Ranks(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env["LOCAL_RANK"]), joined=True)
    if device.type == "cuda":  # (on CPU, each rank's threads: OMP_NUM_THREADS, which `launch` sets)
        if ranks.local_rank >= torch.cuda.device_count():
            raise SystemExit(f"train.nproc: more processes on this host than its {torch.cuda.device_count()} GPUs")
        torch.cuda.set_device(ranks.local_rank)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=TIMEOUT)
    if not ranks.main:  # one log: the other ranks say only what goes wrong
        logging.getLogger().setLevel(logging.WARNING)
    return ranks


def rank_device(device: torch.device, ranks: Ranks) -> torch.device:
    """The device this rank computes on: its own GPU on CUDA."""
    return torch.device("cuda", ranks.local_rank) if device.type == "cuda" and ranks.joined else device


def finish(ranks: Ranks) -> None:
    if ranks.joined:
        dist.barrier()
        dist.destroy_process_group()


def barrier(ranks: Ranks) -> None:
    """The other ranks wait here while rank 0 writes."""
    if ranks.joined:
        dist.barrier()


class ShardedBatches(Sampler[list[int]]):
    """This rank's share of each global batch of `batches`: every rank draws the same global batches (the same
    sampler, seeded alike), so N ranks step through the batches a 1-process run does."""

    def __init__(self, batches: BatchSampler, ranks: Ranks):
        self.batches, self.ranks = batches, ranks

    def __iter__(self):
        for batch in self.batches:
            yield np.array_split(np.asarray(batch), self.ranks.world)[self.ranks.rank].tolist()

    def __len__(self) -> int:
        return len(self.batches)


def shard(dataset: Dataset, ranks: Ranks) -> Dataset:
    """Every `world`-th item from this rank's on: each item on exactly one rank, no padding (`gather` undoes it)."""
    return Subset(dataset, range(ranks.rank, len(dataset), ranks.world)) if ranks.joined else dataset


def gather(logits: np.ndarray, labels: np.ndarray, ranks: Ranks) -> tuple[np.ndarray, np.ndarray]:
    """Every rank's predictions of its `shard`, back in the dataset's order, on every rank."""
    if not ranks.joined:
        return logits, labels
    parts = [None] * ranks.world
    dist.all_gather_object(parts, (logits, labels))
    n = sum(len(y) for _, y in parts)
    all_logits, all_labels = np.empty((n, logits.shape[1]), logits.dtype), np.empty(n, labels.dtype)
    for rank, (z, y) in enumerate(parts):
        all_logits[rank :: ranks.world], all_labels[rank :: ranks.world] = z, y
    return all_logits, all_labels


def mean_over_ranks(value: float, ranks: Ranks) -> float:
    """The mean of every rank's `value` (a mean loss over its share of the batches: the shares are equal). Gathered
    as objects: NCCL reduces only CUDA tensors."""
    return sum(all_gathered(value, ranks)) / ranks.world if ranks.joined else value


def all_gathered(obj, ranks: Ranks) -> list:
    """[each rank's obj], on every rank."""
    if not ranks.joined:
        return [obj]
    parts = [None] * ranks.world
    dist.all_gather_object(parts, obj)
    return parts


def check_same_weights(model: torch.nn.Module, ranks: Ranks) -> None:
    """Every rank holds the same parameters (DDP keeps them so): a difference would be a silent bug, so it stops."""
    if not ranks.joined:
        return
    sums = all_gathered(sum(float(q.detach().double().sum()) for q in model.parameters()), ranks)
    if len(set(sums)) > 1:
        raise SystemExit(f"train: the {ranks.world} processes' weights differ ({sums}): a bug, please report it")


def torchrun_command(module: str, argv: list[str], nproc: int, nnodes: int, endpoint: str, run_id: str) -> list[str]:
    """`torchrun` (as `python -m torch.distributed.run`, the venv's) running `python -m module argv` in `nproc`
    processes on this host, of `nnodes` hosts meeting at `endpoint`."""
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}"]
    if nnodes == 1:
        cmd.append("--standalone")
    else:  # the host that owns the endpoint's address serves the rendezvous (torchrun guesses from the hostname,
        # which misses a second network card)
        cmd += [f"--nnodes={nnodes}", "--rdzv-backend=c10d", f"--rdzv-endpoint={endpoint}", f"--rdzv-id={run_id}"]
        cmd.append(f"--rdzv-conf=is_host={str(owns_address(endpoint.rsplit(':', 1)[0].strip('[]'))).lower()}")
    return [*cmd, "-m", module, *argv]


def owns_address(host: str) -> bool:
    """Whether `host` (a name or an address) is an address of this host: one a socket can be bound to."""
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except socket.gaierror:
        return False
    for family, kind, _, _, address in infos:
        with socket.socket(family, kind) as s:
            try:
                s.bind((address[0], 0))
            except OSError:
                continue
            return True
    return False


def launch(module: str, argv: list[str], nproc: int, nnodes: int, endpoint: str, run_id: str) -> None:
    """Run the stage `module` under torchrun and wait; a failed rank (torchrun then stops the others) ends it with
    one line."""
    cmd = torchrun_command(module, argv, nproc, nnodes, endpoint, run_id)
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, cpu_cores() // nproc)))  # the cores shared (torchrun's default: 1)
    log.info("%d processes on this host%s: %s", nproc, f" of {nnodes}" if nnodes > 1 else "", " ".join(cmd[1:]))
    code = subprocess.run(cmd, env=env).returncode
    if code != 0:
        raise SystemExit(
            f"{module.rsplit('.', 1)[-1]}: a process of the {nproc * nnodes} under torchrun failed (exit status "
            f"{code}; torchrun's report above names the rank) and the others were stopped; the next 'dvc repro' "
            "resumes from the last checkpoint"
        )
