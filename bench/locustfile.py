"""Locust users for bench/load_test.py: each POSTs a random real JPEG to /classify, back to back.

`locust -f bench/locustfile.py --headless --host http://127.0.0.1:3000 -u 16 -r 16 -t 30s` also works
alone; LOAD_PHOTOS names the folder of JPEGs, searched recursively (default: the shared real photos).
"""

import os
import random
from pathlib import Path

from locust import HttpUser, constant, task

FOLDER = Path(os.environ.get("LOAD_PHOTOS", Path(__file__).resolve().parents[2] / "shared/data/real-photos-200px"))
PHOTOS = [(p.name, p.read_bytes()) for p in sorted(FOLDER.rglob("*.jpg"))]
if not PHOTOS:  # else every request would fail in random.choice
    raise SystemExit(
        f"no JPEGs in {FOLDER}: set LOAD_PHOTOS to a folder of photos (after `dvc repro`: data/prepared/valid)"
    )


class Client(HttpUser):
    wait_time = constant(0)  # no think time: the clients keep the service saturated

    @task
    def classify(self):
        name, data = random.choice(PHOTOS)
        self.client.post("/classify", files={"image": (name, data, "image/jpeg")}, name="/classify", timeout=120)
