"""The BentoML service: upload a photo, get cat or dog, from the ONNX model `dvc repro package` put in the store.

`make serve` (or `bentoml serve serving.service:DogsVsCats --host 127.0.0.1 --port 3000`). As BentoML's model
composition: `DogsVsCats`, the HTTP API (`POST /classify`, field `image`; `POST /classify_batch`, field `images`,
repeated), checks and decodes uploads (serving/upload_guard.py, serving/photos.py) and sends clean arrays to
`Classifier`, which holds the ONNX Runtime session and batches requests; P(dog) is calibrated as `predict` makes the
submission's. `GET /` is a page for people, `GET /info` the model's facts (serving/page.py). Settings: params.yaml's
`serve` section (`DOGSCATS_PARAMS` names another file); the store: `BENTOML_HOME`. BentoML 1.4 workarounds:
serving/no_cork.py, connections.py, metrics_labels.py, tempdir.py.
"""

from __future__ import annotations

import logging
import os
from http import HTTPStatus
from pathlib import Path

import aiohttp
import bentoml
import numpy as np
from bentoml.exceptions import BentoMLException

from pipeline.config import load_params
from pipeline.data import open_model
from pipeline.params.package import PackageParams
from pipeline.params.serve import ServeParams
from serving import metrics_labels, no_cork, page
from serving.connections import cancel_request_timeouts, guard_connections
from serving.photos import PhotoDecoder
from serving.store import check_stored, stored_contract, stored_model
from serving.tempdir import remove_worker_tempdir, use_worker_tempdir
from serving.upload_guard import BadUpload, UploadGuard, error

log = logging.getLogger("bentoml.dogs_vs_cats")  # under "bentoml": BentoML's log handlers show it

PARAMS_FILE = os.environ.get("DOGSCATS_PARAMS", str(Path(__file__).resolve().parents[1] / "params.yaml"))
SERVE = load_params(ServeParams, "serve", PARAMS_FILE)  # read at import: the decorators below need it
MODEL_NAME = load_params(PackageParams, "package", PARAMS_FILE).model_name
STORED = stored_model(MODEL_NAME)  # None (with a warning): importable without a model, as the unit tests import it
MODEL = bentoml.models.BentoModel(f"{MODEL_NAME}:latest")

no_cork.install()  # a batch leaves when the model is free, not after the mean queue wait of the last burst
metrics_labels.install()  # /metrics labelled by route: a made-up path is no new series (issue 24)
cancel_request_timeouts()  # a request's timer goes when it is answered, not traffic.timeout later (issue 24)


# runner_connection: BentoML 1.4's client to this service replaces its connection pool every 100 requests,
# dropping requests in flight (see DogsVsCats.infer). Measured by bench/load_test.py, 16 clients, 30 s:
# 11% of requests retried with the default; RUNNER_MAX_REQUESTS keeps one pool for the whole run.
RUNNER_MAX_REQUESTS = 1_000_000


@bentoml.service(
    resources={"gpu": 1},
    workers=SERVE.workers,
    traffic={"timeout": 120},
    runner_connection={"max_requests": RUNNER_MAX_REQUESTS},
)
class Classifier:
    """The model: preprocessed images (N, 3, H, W), or (N, K, 3, H, W) with K TTA crops -> calibrated P(dog) (N,),
    batched across requests."""

    model = MODEL

    def __init__(self) -> None:
        use_worker_tempdir()  # before BentoML makes its client folders (serving/tempdir.py)
        self.contract = stored_contract(self.model)  # preprocessing, classes, TTA and calibration, as package stored
        # serve.variant auto: fp16 on CUDA, int8 on CPU (speed), when they passed export's check (the store holds
        # the variants export kept)
        self.session, self.provider, self.variant = open_model(
            self.model.path, SERVE.provider, SERVE.variant, SERVE.threads
        )
        # BentoML starts a service that asks for a GPU on a machine without one, and says nothing: say it
        log.info(
            "model %s (%s) on ONNX Runtime's %s provider%s",
            self.model.tag,
            self.variant,
            self.provider.upper(),
            "" if self.provider == "cuda" else " (no usable GPU: this service asked for one, running on CPU)",
        )

    # serve.max_batch_size 1 turns adaptive batching off (BentoML refuses a batch size of 1): the load test's baseline
    @bentoml.api(
        batchable=SERVE.max_batch_size > 1,
        batch_dim=0,
        max_batch_size=max(2, SERVE.max_batch_size),
        max_latency_ms=SERVE.max_latency_ms,
    )
    def predict(self, images: np.ndarray) -> np.ndarray:
        """P(dog) (N,) as the submission computes it: TTA, temperature and clip as `package` stored them."""
        return self.contract.predict(self.session, images)

    @bentoml.api
    async def describe(self) -> dict:
        """The variant and provider this model worker runs (GET /info shows them). Async: it runs on the event
        loop, not in the thread pool that `predict`'s batches wait for."""
        return {"variant": self.variant, "provider": self.provider}

    @bentoml.on_shutdown
    def remove_tempdir(self) -> None:
        remove_worker_tempdir()


@bentoml.service(traffic={"timeout": 120})
class DogsVsCats:
    """The HTTP API: checks and decodes uploads, asks `Classifier`, answers in JSON."""

    model = MODEL
    classifier = bentoml.depends(Classifier)

    @bentoml.on_deployment
    def check_model() -> None:
        """Once, in the server's main process, before any worker starts: a broken model stops the server with what
        to run (serving/store.py)."""
        if STORED is not None:
            check_stored(STORED)

    def __init__(self) -> None:
        use_worker_tempdir()  # uploads go there, and a killed worker's are removed (serving/tempdir.py)
        guard_connections(SERVE.header_timeout_s, SERVE.body_timeout_s, SERVE.max_connections)  # before it serves
        self.contract = stored_contract(self.model)
        # checks, decodes and preprocesses uploads into the views the stored calibration averages
        self.photos = PhotoDecoder(SERVE, self.contract)
        self.running: dict | None = None  # the model worker's variant and provider, asked once (GET /info)

    async def running_variant(self) -> dict | None:
        """What the model worker runs: {"variant", "provider"}, asked once and kept (they do not change while it
        runs); None while it cannot be asked (still loading, or gone), and asked again next time."""
        if self.running is None:
            for _ in range(3):  # a dropped pooled connection, as in `infer`
                try:
                    self.running = await self.classifier.to_async.describe()
                    break
                except (aiohttp.ClientError, BentoMLException) as e:  # dropped; or an error status
                    log.warning("GET /info: the model service did not answer (%s)", e.__class__.__name__)
        return self.running

    async def infer(self, x: np.ndarray) -> np.ndarray:
        """Classifier.predict on a batch (N, 3, H, W) or (N, K, 3, H, W), retried on a dropped connection.

        BentoML 1.4's client to a dependency replaces its connection pool every 100 requests (and 5 min),
        closing requests still in flight on the old pool, and keeps idle connections longer than the model
        service's server does (bentoml/BentoML#4971, fix pending upstream in #5698). Measured here: ~20% of
        requests under 32 concurrent clients hit one. Inference is idempotent, so retry, twice at most."""
        for attempt in range(3):
            try:
                return await self.classifier.to_async.predict(x)
            except aiohttp.ClientConnectionError as e:  # ServerDisconnectedError and its kin
                if attempt == 2:
                    raise
                log.warning("connection to the model service dropped (%s): retrying", e.__class__.__name__)

    @staticmethod
    def answer(p_dog: float) -> dict:
        p_dog = float(p_dog)
        return {"label": "dog" if p_dog >= 0.5 else "cat", "p_dog": p_dog, "p_cat": 1.0 - p_dog}

    @bentoml.api
    async def classify(self, image: Path) -> dict:
        """One photo (multipart field `image`) -> {"label", "p_dog", "p_cat"}: the submission's calibrated P(dog)."""
        try:
            (x,) = await self.photos.decode([image], ["image"])
        except BadUpload as e:
            return error(e.status, str(e))
        p_dog = await self.infer(x[None])
        return self.answer(p_dog[0])

    @bentoml.api
    async def classify_batch(self, images: list[Path]) -> list[dict]:
        """Several photos (multipart field `images`, repeated) -> one answer each, in order."""
        if not images:
            return error(HTTPStatus.BAD_REQUEST, "no images: send one or more files in the multipart field 'images'")
        if len(images) > SERVE.max_batch_images:
            msg = f"{len(images)} images, over the limit of {SERVE.max_batch_images} per request"
            return error(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, msg)
        try:
            xs = await self.photos.decode(images, [f"image {i + 1}" for i in range(len(images))])
        except BadUpload as e:
            return error(e.status, str(e))
        p_dog = await self.infer(np.stack(xs))
        return [self.answer(p) for p in p_dog]


DogsVsCats.add_asgi_middleware(UploadGuard, serve=SERVE)
DogsVsCats.mount_asgi_app(page.app(), path="/", name="page")
