"""tidy (`make tidy`) and the pipeline's own temporary files: what a killed write left beside the pipeline's outputs
(train's final save, a checkpoint, a prepared or exported folder) and what a killed `package` left in the BentoML
store's staging folder are removed; what is not the pipeline's is kept; nothing is removed while DVC runs. The
abandoned checkpoints tidy removes are tested in tests/test_pipeline.py (a real `dvc repro`)."""

import subprocess

from pipeline.files import is_temporary, temporary_sibling
from tests.conftest import BIN, ROOT, features, make_project, tool_env, train_cmd, write_params

TIDY = [str(BIN / "python"), "-m", "pipeline.tools.tidy"]

# what a write killed in each stage leaves (dvc.yaml's paths, one member: model), files and folders
LEFTOVERS = [
    "models/.model.pt.tmp",  # train's final save: 174 MB for VGG16
    "models/.model.checkpoint.pt.tmp",  # train's checkpoint of an epoch
    "data/.prepared.tmp/train/cats/cat.1.jpg",  # prepare's folder
    "data/features/.model.tmp/train.npy",  # features' cache
    "models/onnx/.model.tmp/model.onnx",  # export's folder
    "metrics/members/model/.evaluate.json.tmp",
    "predictions/test/.model.csv.tmp",  # predict's member logits, inside an output folder
    "submissions/.submission.csv.tmp",
]


def leave(project, relative: str) -> None:
    path = project / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\0" * 1000)


def test_temporary_files_are_recognisable(tmp_path):
    assert is_temporary(temporary_sibling(tmp_path / "model.pt"))
    assert not is_temporary(tmp_path / "model.pt") and not is_temporary(tmp_path / ".tmp")
    assert not is_temporary(tmp_path / "notes.tmp")  # a temporary sibling is hidden: .<name>.tmp


def test_tidy_removes_what_killed_writes_left_beside_the_outputs_and_keeps_the_rest(tmp_path):
    project = make_project(tmp_path / "project", {})
    for relative in LEFTOVERS:
        leave(project, relative)
    kept = ["downloads/.notes.tmp", "models/model.pt", ".hidden.tmp", "data/prepared/train/cats/.x.tmp.jpg"]
    for relative in kept:
        leave(project, relative)
    done = subprocess.run(TIDY, cwd=project, env=tool_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    for relative in LEFTOVERS:
        top = next(p for p in [project / relative, *(project / relative).parents] if is_temporary(p))
        assert not top.exists(), f"{top} was left"
        assert f"removed {top.relative_to(project)}" in done.stderr, done.stderr
    for relative in kept:
        assert (project / relative).exists(), f"tidy removed {relative}, which is not a temporary of the pipeline"
    assert "Traceback" not in done.stderr


def test_tidy_removes_the_staging_a_killed_package_left_in_the_store(tmp_path):
    project = make_project(tmp_path / "project", {})
    staging = tmp_path / "bentoml" / "tmp" / "package"
    left = staging / "bentoml-model-dogs-vs-cats-x1y2z3"  # BentoML's mkdtemp, params.yaml's package.model_name
    other = staging / "bentoml-model-another-model-abc"  # another project's model in the same store
    for folder in (left, other):
        (folder / "model.onnx").parent.mkdir(parents=True)
        (folder / "model.onnx").write_bytes(b"\0" * 1000)
    env = {**tool_env(), "BENTOML_HOME": str(tmp_path / "bentoml")}
    done = subprocess.run(TIDY, cwd=project, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert not left.exists() and f"removed {left}" in done.stderr, done.stderr
    assert other.exists()


def test_tidy_removes_nothing_while_dvc_runs(tmp_path):
    from dvc.repo import Repo

    project = make_project(tmp_path / "project", {})
    leave(project, LEFTOVERS[0])
    with Repo(str(project)) as repo, repo.lock:  # as `dvc repro` holds it: the temporary may be being written
        done = subprocess.run(TIDY, cwd=project, env=tool_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith("tidy: a DVC command is running"), done.stderr
    assert (project / LEFTOVERS[0]).exists()


def test_train_removes_the_temporaries_a_killed_save_left_before_it_trains(prepared, tmp_path):
    """A SIGKILL during train's final save leaves .model.pt.tmp; the next run frees that space first."""
    params = write_params(tmp_path / "p.yaml", epochs=1)
    features(tmp_path, prepared, params)
    stale = [temporary_sibling(tmp_path / "model.pt"), temporary_sibling(tmp_path / "ckpt.pt")]
    for path in stale:
        path.write_bytes(b"\0" * 1000)
    done = subprocess.run(train_cmd(tmp_path, prepared, params), cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    for path in stale:
        assert f"removed {path} (0.0 MB), left by an interrupted write" in done.stderr, done.stderr
        assert not path.exists()
    assert (tmp_path / "model.pt").exists()
