"""train under torchrun (train.nproc, train.nnodes): 2 processes on CPU with gloo train like 1 at the same global
batch and alike twice; a killed rank stops the run with one message and the next run resumes to the same bytes;
two hosts (network namespaces joined by a veth pair) meet at a rendezvous; validation counts each image once."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import uuid

import numpy as np
import pytest
import torch

from tests.conftest import (
    BIN,
    ROOT,
    TINY_DEMO,
    dvc,
    features,
    features_cmd,
    make_project,
    run_train,
    tool_env,
    train_cmd,
    write_params,
)


def history(work) -> list[dict]:
    return torch.load(work / "model.pt", weights_only=False)["history"]


# fine_tune of a small model with BatchNorm (EfficientNet-Lite0, random weights: 4.7M parameters to all-reduce a step)
SETTINGS = dict(arch="efficientnet_lite0", finetune="all", head_epochs=2, epochs=2, augment=True, lr=0.001)


@pytest.fixture(scope="module")
def two_processes(prepared, tmp_path_factory):
    """A 2-process run of fine_tune (the head on cached activations, then the body on augmented images), and the
    1-process run of the same params."""
    tmp = tmp_path_factory.mktemp("ddp")
    settings = dict(SETTINGS, batch_size=8)
    one = write_params(tmp / "one.yaml", **settings)
    two = write_params(tmp / "two.yaml", **settings, nproc=2)
    logs = {"one": run_train(tmp / "one", prepared, one), "features": features(tmp / "two", prepared, two)}
    done = subprocess.run(train_cmd(tmp / "two", prepared, two), cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    return tmp, two, {**logs, "two": done.stderr}


def test_two_processes_train_as_one_does_and_alike_twice(prepared, two_processes):
    tmp, params, logs = two_processes
    assert "2 processes on this host" in logs["two"] and "each on 1/2 of every batch" in logs["two"], logs["two"]
    assert "8 valid images" in logs["two"]  # each rank validates its shard; the log counts them all
    one, two = history(tmp / "one"), history(tmp / "two")
    assert len(one) == len(two) == 4
    # the head on cached activations (the demo's model): the same global batches, each rank on half of each. The
    # unfrozen phase then draws dropout masks and augmentations per rank: no longer the 1-process run's draws
    for a, b in zip(one[:2], two[:2], strict=True):
        assert abs(a["valid_log_loss"] - b["valid_log_loss"]) < 0.002, (one, two)
    assert all(0 < h["valid_log_loss"] < 1.5 for h in two), two
    # features ran in the 2 processes too, each on a block of every split's rows, into one cache
    assert "2 processes on this host" in logs["features"], logs["features"]
    for split in ("train", "valid"):
        a, b = (np.load(tmp / run / "features" / f"{split}.npy") for run in ("one", "two"))
        assert a.shape == b.shape and np.allclose(a, b, atol=1e-5)
        assert (tmp / "one" / "features" / f"{split}_labels.npy").read_bytes() == (
            tmp / "two" / "features" / f"{split}_labels.npy"
        ).read_bytes()
    log = run_train(tmp / "again", prepared, params)
    assert (tmp / "two" / "model.pt").read_bytes() == (tmp / "again" / "model.pt").read_bytes(), log


def test_validation_shards_hold_every_image_once():
    from pipeline.distributed import Ranks, shard

    items = list(range(11))
    shards = [list(shard(items, Ranks(rank, 3, joined=True))) for rank in range(3)]
    assert sorted(sum(shards, [])) == items and [len(s) for s in shards] == [4, 4, 3]  # no padding


def test_each_rank_takes_its_share_of_the_one_process_batches():
    from torch.utils.data import BatchSampler, RandomSampler

    from pipeline.distributed import Ranks, ShardedBatches

    def batches(ranks=None):
        sampler = BatchSampler(RandomSampler(range(40), generator=torch.Generator().manual_seed(0)), 8, True)
        return list(sampler) if ranks is None else list(ShardedBatches(sampler, ranks))

    whole, first, second = batches(), batches(Ranks(0, 2, joined=True)), batches(Ranks(1, 2, joined=True))
    assert [a + b for a, b in zip(first, second, strict=True)] == whole
    assert all(len(a) == len(b) == 4 for a, b in zip(first, second, strict=True))


def test_a_global_batch_must_split_evenly(tmp_path):
    from pipeline.config import ConfigError
    from pipeline.params.train import load_member

    with pytest.raises(ConfigError, match=r"batch_size \(30\) must be a multiple of the 4 processes"):
        load_member(None, write_params(tmp_path / "p.yaml", batch_size=30, nproc=4))
    with pytest.raises(ConfigError, match="nnodes > 1 needs rdzv_endpoint"):
        load_member(None, write_params(tmp_path / "q.yaml", nnodes=2))


def rank_process(launcher: int, rank: str):
    """The worker of `rank` among the launcher's descendants (torchrun's agent starts them), or None yet."""
    import psutil

    for child in psutil.Process(launcher).children(recursive=True):
        try:
            if child.environ().get("RANK") == rank and "LOCAL_RANK" in child.environ():
                return child
        except psutil.NoSuchProcess:
            continue
    return None


@pytest.mark.slow
def test_a_killed_rank_stops_the_run_with_one_message_and_the_next_run_resumes(prepared, tmp_path, two_processes):
    """Killed in fine_tune's second phase (the body unfrozen): the resumed run rebuilds DDP over what that phase
    trains, and ends with the uninterrupted 2-process run's bytes."""
    _, params, _ = two_processes
    work = tmp_path / "broken"
    features(work, prepared, params)
    proc = subprocess.Popen(train_cmd(work, prepared, params), cwd=ROOT, stderr=subprocess.PIPE, text=True)
    saves, victim, deadline = set(), None, time.monotonic() + 300
    while len(saves) < 3 and proc.poll() is None and time.monotonic() < deadline:  # epochs 1, 2 (head), 3 (all)
        victim = victim or rank_process(proc.pid, "1")
        if (work / "ckpt.pt").exists():
            stat = (work / "ckpt.pt").stat()
            saves.add((stat.st_ino, stat.st_mtime_ns))  # each save replaces the file
        time.sleep(0.005)
    assert victim is not None, "rank 1 was not found"
    victim.send_signal(signal.SIGKILL)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 1, err
    assert err.strip().splitlines()[-1].startswith("train: a process of the 2 under torchrun failed"), err
    done_epochs = torch.load(work / "ckpt.pt", weights_only=False)["epoch"]
    assert done_epochs == 3, "the run was not interrupted in its second phase"
    assert not (work / "model.pt").exists()

    log = run_train(work, prepared, params)
    assert re.search(r"resuming from .*ckpt.pt after epoch 3 of 4", log), log
    assert "epoch 3/4" not in log and "epoch 4/4" in log
    assert (work / "model.pt").read_bytes() == (two_processes[0] / "two" / "model.pt").read_bytes()


def netns(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True)


@pytest.fixture
def two_hosts():
    """Two network namespaces joined by a veth pair, 10.77.0.1 and 10.77.0.2: as two hosts on one network."""
    if shutil.which("ip") is None:
        pytest.skip("two hosts: iproute2's ip is not installed")
    tag = uuid.uuid4().hex[:6]
    names, links = (f"dvc-a-{tag}", f"dvc-b-{tag}"), (f"va{tag}", f"vb{tag}")
    made = netns("netns", "add", names[0])
    if made.returncode != 0:
        pytest.skip(f"two hosts: network namespaces cannot be made here ({made.stderr.strip()}): needs root")
    try:
        for step in (
            ("netns", "add", names[1]),
            ("link", "add", links[0], "type", "veth", "peer", "name", links[1]),
            *(("link", "set", link, "netns", name) for link, name in zip(links, names, strict=True)),
            *(
                ("-n", name, "addr", "add", f"10.77.0.{i}/24", "dev", link)
                for i, (name, link) in enumerate(zip(names, links, strict=True), 1)
            ),  # fmt: skip
            *(("-n", name, "link", "set", link, "up") for name, link in zip(names, links, strict=True)),
            *(("-n", name, "link", "set", "lo", "up") for name in names),
        ):
            done = netns(*step)
            if done.returncode != 0:
                pytest.skip(f"two hosts: ip {' '.join(step)} failed: {done.stderr.strip()}")
        yield [(name, link, f"10.77.0.{i}") for i, (name, link) in enumerate(zip(names, links, strict=True), 1)]
    finally:
        for name in names:
            netns("netns", "delete", name)


@pytest.mark.slow
def test_two_hosts_meet_at_the_rendezvous_and_train_as_two_processes_on_one_do(
    prepared, tmp_path, two_hosts, two_processes
):
    params = write_params(tmp_path / "p.yaml", **SETTINGS, nnodes=2, rdzv_endpoint="10.77.0.1:29477")
    work = tmp_path / "hosts"

    def on_each_host(cmd: list[str]) -> list[str]:
        """`cmd` on both hosts at once, as `dvc repro` runs each stage there; their logs."""
        runs = []
        for name, link, address in two_hosts:
            # 1 thread a process, as the 2 processes on one host: the same arithmetic
            env = {**os.environ, "PET_LOCAL_ADDR": address, "GLOO_SOCKET_IFNAME": link, "OMP_NUM_THREADS": "1"}
            runs.append(subprocess.Popen(["ip", "netns", "exec", name, *cmd], cwd=ROOT, env=env, stderr=subprocess.PIPE,
                                         text=True))  # fmt: skip
        logs = [run.communicate(timeout=600)[1] for run in runs]
        print("\n--- host a ---\n" + logs[0] + "\n--- host b ---\n" + logs[1])  # the note quotes this log
        assert [run.returncode for run in runs] == [0, 0], logs
        return logs

    on_each_host(features_cmd(work, prepared, params))
    logs = on_each_host(train_cmd(work, prepared, params))
    assert all("1 processes on this host of 2" in log for log in logs), logs
    assert "2 processes, each on 1/2 of every batch" in logs[0] + logs[1], logs
    hosts, two = history(work), history(two_processes[0] / "two")  # 2 processes on one host, the same ranks
    assert np.allclose([h["valid_log_loss"] for h in hosts], [h["valid_log_loss"] for h in two], atol=0.002)


def test_torchrun_command_names_the_rendezvous():
    from pipeline.distributed import torchrun_command

    alone = torchrun_command("pipeline.stages.train", ["--member", "m"], 2, 1, "", "train-m")
    assert alone[:4] == [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2"]
    assert "--standalone" in alone and alone[-4:] == ["-m", "pipeline.stages.train", "--member", "m"]
    hosts = torchrun_command("pipeline.stages.train", [], 1, 2, "192.0.2.1:29400", "train-m")  # TEST-NET: not ours
    assert "--standalone" not in hosts and "--rdzv-endpoint=192.0.2.1:29400" in hosts and "--nnodes=2" in hosts
    assert "--rdzv-conf=is_host=false" in hosts
    first = torchrun_command("pipeline.stages.train", [], 1, 2, "127.0.0.1:29400", "train-m")
    assert "--rdzv-conf=is_host=true" in first  # this host serves the rendezvous


@pytest.mark.slow
def test_dvc_repro_runs_train_under_torchrun_and_the_next_dvc_repro_resumes_a_killed_rank(tmp_path):
    """`dvc repro` with train.nproc=2 on the tiny demo: a rank killed in the unfrozen phase fails the stage with one
    line, the next `dvc repro` resumes from the checkpoint, and its model has the bytes of an uninterrupted run."""
    tiny = {**TINY_DEMO, **{f"train.{key}": value for key, value in SETTINGS.items()}}
    tiny.update({"train.image_size": 32, "train.batch_size": 8, "train.workers": 0, "train.nproc": 2})
    whole, broken = (make_project(tmp_path / name, tiny) for name in ("whole", "broken"))
    log = dvc(whole, "repro", "train")
    assert "2 processes on this host" in log and "each on 1/2 of every batch" in log, log
    assert len(json.loads((whole / "dvclive" / "model" / "metrics.json").read_text())) > 0

    dvc(broken, "repro", "features")
    checkpoint = broken / "models" / "model.checkpoint.pt"
    proc = subprocess.Popen([str(BIN / "dvc"), "repro", "train"], cwd=broken, env=tool_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)  # fmt: skip
    saves, victim, deadline = set(), None, time.monotonic() + 300
    while len(saves) < 3 and proc.poll() is None and time.monotonic() < deadline:  # epochs 1, 2 (head), 3 (all)
        victim = victim or rank_process(proc.pid, "1")
        if checkpoint.exists():
            stat = checkpoint.stat()
            saves.add((stat.st_ino, stat.st_mtime_ns))
        time.sleep(0.005)
    assert victim is not None, "rank 1 was not found"
    victim.send_signal(signal.SIGKILL)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode != 0, out
    assert "train: a process of the 2 under torchrun failed" in out, out
    assert torch.load(checkpoint, weights_only=False)["epoch"] == 3, "the run was not interrupted in its second phase"

    log = dvc(broken, "repro", "train")
    assert "Running stage 'features@model'" not in log, log
    assert re.search(r"resuming from .*model.checkpoint.pt after epoch 3 of 4", log), log
    assert (broken / "models" / "model.pt").read_bytes() == (whole / "models" / "model.pt").read_bytes()
    assert not checkpoint.exists()  # a finished run removes its checkpoint
    assert "up to date" in dvc(broken, "repro", "train")
