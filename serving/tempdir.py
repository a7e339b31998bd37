"""A temporary folder of each worker process, for what BentoML 1.4 writes to the system's: users' uploaded photos.

BentoML writes each uploaded file into a `bentoml-request-*` folder of tempfile's (bentoml/_internal/context.py's
`request_tempdir_pool`, _bentoml_sdk/validators.py) and empties it when the request ends, but not when the worker is
killed, and never removes the folders; each client to a service (the API's to the model, each worker's to itself,
_bentoml_impl/client) makes a `bentoml-client-*` TemporaryDirectory that outlives a stopped worker. There is no setting
for where (issue 24, item 8). `use_worker_tempdir` points this process's tempfile at
<system temp>/dogs-vs-cats-<uid>/<pid>, after removing the folders of workers that no longer run (a SIGKILLed one's,
with the photos of its requests in flight); `remove_worker_tempdir` removes this one at a clean stop. Each service's
`__init__` calls the first, before BentoML makes its clients; the second is a shutdown hook.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

MINE: Path | None = None  # this process's folder, once use_worker_tempdir made it


def running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def use_worker_tempdir() -> Path:
    """Make <root>/<pid> this process's tempfile folder, having removed those of processes that are gone."""
    global MINE
    root = Path(tempfile.gettempdir()) / f"dogs-vs-cats-{os.getuid()}"
    root.mkdir(mode=0o700, exist_ok=True)
    for folder in root.iterdir():
        if folder.name.isdigit() and not running(int(folder.name)):
            shutil.rmtree(folder, ignore_errors=True)  # another worker may be removing it too
    mine = root / str(os.getpid())
    shutil.rmtree(mine, ignore_errors=True)  # this pid's earlier owner, gone
    mine.mkdir(mode=0o700)
    tempfile.tempdir = str(mine)  # BentoML's mkdtemp and TemporaryDirectory calls read it when they make a folder
    MINE = mine
    return mine


def remove_worker_tempdir() -> None:
    """Remove this process's folder (a clean stop): BentoML's request folders and its clients' are in it."""
    if MINE is not None:
        shutil.rmtree(MINE, ignore_errors=True)
