"""The BentoML service: upload a photo, get cat or dog, from the ONNX model in the BentoML model store.

`make serve` (or `bentoml serve serving.service:DogsVsCats --host 127.0.0.1 --port 3000`) after
`dvc repro package` imported the model. Two services, as in BentoML's model-composition pattern:

- `DogsVsCats` (the HTTP API): `POST /classify` (multipart field `image`) and `POST /classify_batch`
  (field `images`, repeated) decode and check each upload in a thread (never on the event loop), answer
  4xx with a message for bad input, and send only clean, preprocessed arrays on;
- `Classifier` (asks for one GPU): holds the ONNX Runtime session; its `predict` is batchable, so
  concurrent requests of both endpoints share forward passes (adaptive batching). A bad upload can never
  fail a batch that other clients' images are in, because it never reaches it.

Preprocessing comes from the ONNX metadata through `pipeline.data.preprocess`, the function `predict`
uses. `GET /` is a page for people (serving/page.html), `GET /info` the model's version and validation
metrics for it. BentoML adds `/livez`, `/readyz` and Prometheus `/metrics`. Settings: the `serve` section of
params.yaml (`DOGSCATS_PARAMS` names another file); the store: `BENTOML_HOME` (default ~/bentoml).
"""

from __future__ import annotations

import asyncio
import logging
import os
from http import HTTPStatus
from pathlib import Path

import aiohttp
import bentoml
import numpy as np
from bentoml.exceptions import NotFound
from starlette.applications import Starlette
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse
from starlette.routing import Route

from pipeline.config import PackageParams, ServeParams, load_params
from pipeline.data import ImageError, load_image, open_model, preprocess, read_metadata

log = logging.getLogger("bentoml.dogs_vs_cats")  # under "bentoml": BentoML's log handlers show it

PARAMS_FILE = os.environ.get("DOGSCATS_PARAMS", str(Path(__file__).resolve().parents[1] / "params.yaml"))
SERVE = load_params(ServeParams, "serve", PARAMS_FILE)  # read at import: the decorators below need it
MODEL_NAME = load_params(PackageParams, "package", PARAMS_FILE).model_name
try:
    STORED = bentoml.models.get(f"{MODEL_NAME}:latest")
except NotFound:  # importable without a model (the tests' unit parts); `bentoml serve` then fails with BentoML's
    STORED = None  # own error, which talks of a cloud context: say first what to run
    log.warning(
        "no model '%s' in the BentoML store (%s): run 'dvc repro package' (or 'make demo') first, with the same "
        "BENTOML_HOME",
        MODEL_NAME,
        os.environ.get("BENTOML_HOME", "~/bentoml"),
    )
# a killed `package` can leave a model with part of its files: refuse it here, in every process, so the server
# exits with this message instead of restarting a model worker that cannot load it
_short = {
    name: size
    for name, size in (STORED.info.metadata.get("files", {}) if STORED is not None else {}).items()
    if not (Path(STORED.path) / name).is_file() or (Path(STORED.path) / name).stat().st_size != size
}
if _short:
    raise SystemExit(
        f"model {STORED.tag} in the BentoML store is incomplete (files missing or short: {', '.join(_short)}), as an "
        "interrupted 'dvc repro package' leaves it: run 'dvc repro package' again"
    )
MODEL = bentoml.models.BentoModel(f"{MODEL_NAME}:latest")


UPLOAD_FIELDS = {"/classify": "image", "/classify_batch": "images"}  # endpoint -> its multipart field


class BadUpload(ValueError):
    """An upload the service cannot use; `status` is the HTTP status to answer with."""

    def __init__(self, message: str, status: HTTPStatus = HTTPStatus.BAD_REQUEST):
        super().__init__(message)
        self.status = status


def error(status: HTTPStatus, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


class UploadGuard:
    """ASGI middleware in front of the upload endpoints: a body over the byte limit gets 413 before it is
    spooled, and a form with fields other than the endpoint's, or text where the photo belongs, gets 400.
    (BentoML itself answers 500 to a file in an undeclared field: it json-decodes the file's bytes before
    the API code runs; and it takes a text value in a file field for a URL to download.)"""

    def __init__(self, app, max_body: dict[str, int]):
        self.app, self.max_body = app, max_body

    async def __call__(self, scope, receive, send):
        path = scope.get("path", "")
        if scope["type"] != "http" or scope.get("method") != "POST" or path not in UPLOAD_FIELDS:
            return await self.app(scope, receive, send)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_body[path]:
                msg = f"request body over {self.max_body[path]} bytes: send smaller or fewer photos"
                return await error(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, msg)(scope, receive, send)
            if not message.get("more_body"):
                break
        body, replayed = b"".join(chunks), False

        async def replay():  # hand the buffered body on once, then whatever the client sends (disconnect)
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        request = Request(scope, replay)
        if request.headers.get("content-type", "").startswith("multipart/form-data"):
            try:
                form = await request.form()
            except MultiPartException as e:
                return await error(HTTPStatus.BAD_REQUEST, f"malformed multipart body: {e}")(scope, receive, send)
            unexpected = sorted(set(form.keys()) - {UPLOAD_FIELDS[path]})
            # a text value where a photo belongs: BentoML would take it for a URL to download (a server-side
            # request forgery), so it never gets past here
            texts = [v for v in form.getlist(UPLOAD_FIELDS[path]) if not isinstance(v, UploadFile)]
            await form.close()
            if texts:
                msg = f"field '{UPLOAD_FIELDS[path]}' holds text, not a file: upload the photo itself (multipart file)"
                return await error(HTTPStatus.BAD_REQUEST, msg)(scope, receive, send)
            if unexpected:
                msg = (
                    f"unexpected field(s) {', '.join(unexpected)}: send the photo in the field '{UPLOAD_FIELDS[path]}'"
                )
                return await error(HTTPStatus.BAD_REQUEST, msg)(scope, receive, send)
            replayed = False
        await self.app(scope, replay, send)


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
    """The model: preprocessed images (N, 3, H, W) -> probabilities (N, 2), batched across requests."""

    model = MODEL

    def __init__(self) -> None:
        self.meta = read_metadata(self.model.path)
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
        feed = {self.meta["input_name"]: np.ascontiguousarray(images, dtype=np.float32)}
        return self.session.run([self.meta["output_name"]], feed)[0]


@bentoml.service(traffic={"timeout": 120})
class DogsVsCats:
    """The HTTP API: checks and decodes uploads, asks `Classifier`, answers in JSON."""

    model = MODEL
    classifier = bentoml.depends(Classifier)

    def __init__(self) -> None:
        self.meta = read_metadata(self.model.path)
        self.dog = self.meta["classes"].index("dogs")

    def load(self, upload: Path, name: str) -> np.ndarray:
        """One upload -> a preprocessed (3, H, W) array, or a 4xx error that says what is wrong."""
        size = upload.stat().st_size
        if size == 0:
            raise BadUpload(f"{name} is empty: send a photo (JPEG, PNG, GIF, WebP ...)")
        if size > SERVE.max_bytes:
            raise BadUpload(
                f"{name} is {size} bytes, over the limit of {SERVE.max_bytes}", HTTPStatus.REQUEST_ENTITY_TOO_LARGE
            )
        try:
            img = load_image(upload, SERVE.max_pixels)
        except ImageError as e:
            raise BadUpload(f"{name}: {str(e).replace(str(upload), 'the upload')}") from e
        m = self.meta
        return preprocess(img, m["image_size"], m["resize_size"], m["mean"], m["std"])

    async def infer(self, x: np.ndarray) -> np.ndarray:
        """Classifier.predict on a batch (N, 3, H, W), retried on a dropped connection.

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

    def answer(self, probs: np.ndarray) -> dict:
        p_dog = float(probs[self.dog])
        return {"label": "dog" if p_dog >= 0.5 else "cat", "p_dog": p_dog, "p_cat": float(1.0 - p_dog)}

    @bentoml.api
    async def classify(self, image: Path) -> dict:
        """One photo (multipart field `image`) -> {"label", "p_dog", "p_cat"}."""
        try:
            x = await asyncio.to_thread(self.load, image, "image")  # decoding blocks: keep it off the event loop
        except BadUpload as e:
            return error(e.status, str(e))
        probs = await self.infer(x[None])
        return self.answer(probs[0])

    @bentoml.api
    async def classify_batch(self, images: list[Path]) -> list[dict]:
        """Several photos (multipart field `images`, repeated) -> one answer each, in order."""
        if not images:
            return error(HTTPStatus.BAD_REQUEST, "no images: send one or more files in the multipart field 'images'")
        if len(images) > SERVE.max_batch_images:
            msg = f"{len(images)} images, over the limit of {SERVE.max_batch_images} per request"
            return error(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, msg)
        try:
            xs = await asyncio.gather(
                *(asyncio.to_thread(self.load, p, f"image {i + 1}") for i, p in enumerate(images))
            )
        except BadUpload as e:
            return error(e.status, str(e))
        probs = await self.infer(np.stack(xs))
        return [self.answer(p) for p in probs]


MULTIPART_SLACK = 1 << 20  # headers and boundaries around the files
DogsVsCats.add_asgi_middleware(
    UploadGuard,
    max_body={
        "/classify": SERVE.max_bytes + MULTIPART_SLACK,
        "/classify_batch": SERVE.max_bytes * SERVE.max_batch_images + MULTIPART_SLACK,
    },
)


# --- the page for people: GET / and the model facts it shows, GET /info -------------------------------
PAGE = Path(__file__).with_name("page.html")


async def page(_: Request) -> FileResponse:
    return FileResponse(PAGE, media_type="text/html")


async def model_info(_: Request) -> JSONResponse:
    """The served model's tag and its validation metrics, from the store's metadata (no second model load)."""
    model = bentoml.get_current_service().model  # the DogsVsCats instance of this worker
    meta = model.info.metadata
    return JSONResponse(
        {
            "name": model.tag.name,
            "version": model.tag.version,
            "created": model.info.creation_time.isoformat(),
            "evaluate": meta.get("evaluate"),  # absent when the package stage found no metrics/evaluate.json
            "export": meta.get("export"),
        }
    )


# Mounted at "/": BentoML's PassiveMount only claims the paths this app has a route for, so the APIs,
# /livez, /readyz and /metrics are untouched, and GET / comes before BentoML's own index page.
DogsVsCats.mount_asgi_app(Starlette(routes=[Route("/", page), Route("/info", model_info)]), path="/", name="page")
