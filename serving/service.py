"""The BentoML service: upload a photo, get cat or dog, from the ONNX model in the BentoML model store.

`make serve` (or `bentoml serve serving.service:DogsVsCats --host 127.0.0.1 --port 3000`) after
`dvc repro package` imported the model. Two services, as in BentoML's model-composition pattern:

- `DogsVsCats` (the HTTP API): `POST /classify` (multipart field `image`) and `POST /classify_batch`
  (field `images`, repeated) decode and check each upload in a thread (never on the event loop), answer
  4xx with a message for bad input, and send only clean, preprocessed arrays on; `UploadGuard` checks each
  body as it streams in (form, part count, sizes) and spools it to disk, so no body is whole in memory;
- `Classifier` (asks for one GPU): holds the ONNX Runtime session; its `predict` is batchable, so
  concurrent requests of both endpoints share forward passes (adaptive batching). A bad upload can never
  fail a batch that other clients' images are in, because it never reaches it.

Preprocessing comes from the ONNX metadata through `pipeline.data.preprocess`, the function `predict`
uses; flip TTA, temperature and clip from the store's metadata through `pipeline.calibration`, as `predict`
applies them, so `p_dog` is the submission's probability (`GET /info` says when the variant differs).
`GET /` is a page for people (serving/page.html), `GET /info` the model's version, validation metrics and
calibration. BentoML adds `/livez`, `/readyz` and Prometheus `/metrics`. Settings: the `serve` section of
params.yaml (`DOGSCATS_PARAMS` names another file); the store: `BENTOML_HOME` (default ~/bentoml).
"""

from __future__ import annotations

import asyncio
import logging
import os
from http import HTTPStatus
from pathlib import Path
from tempfile import SpooledTemporaryFile

import aiohttp
import bentoml
import numpy as np
from bentoml._internal.marshal import dispatcher as bentoml_dispatcher
from bentoml.exceptions import BentoMLException, NotFound
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.applications import Starlette
from starlette.datastructures import Headers, UploadFile
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse
from starlette.routing import Route

from pipeline.calibration import Calibration, CalibrationError
from pipeline.config import load_params
from pipeline.data import ImageError, auto_variant, decoded_pixels, load_image, open_model, preprocess_as, read_metadata
from pipeline.params.package import PackageParams
from pipeline.params.serve import ServeParams
from serving import metrics_labels
from serving.connections import cancel_request_timeouts, guard_connections
from serving.tempdir import remove_worker_tempdir, use_worker_tempdir

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
        "BENTOML_HOME; if dvc says the stage didn't change (the store was emptied since it ran), "
        "'dvc repro -f -s package'",
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
        "interrupted 'dvc repro package' leaves it: run 'dvc repro -f -s package' (forced: dvc.lock may be current)"
    )
MODEL = bentoml.models.BentoModel(f"{MODEL_NAME}:latest")


def stored_calibration(model) -> Calibration:
    """The TTA, temperature and clip `package` stored with the model: what `predict` applies to the submission."""
    try:
        return Calibration.from_dict(model.info.metadata["calibration"])
    except KeyError:
        raise SystemExit(
            f"model {model.tag} in the BentoML store has no calibration (packaged before the service applied the "
            "submission's): run 'dvc repro -f -s package' (forced: dvc.lock may be current)"
        ) from None
    except CalibrationError as e:
        raise SystemExit(f"model {model.tag}: {e}") from None


# checked here too, in every process, for the same reason: raised in a worker's __init__, the server would keep
# restarting it and never answer
CALIBRATION = stored_calibration(STORED) if STORED is not None else None


UPLOAD_FIELDS = {"/classify": "image", "/classify_batch": "images"}  # endpoint -> its multipart field
MAX_PARTS = {"/classify": 1, "/classify_batch": SERVE.max_batch_images}  # endpoint -> files in one request
PART_SLACK = 8 << 10  # a part's boundary line and headers, at most (FormCheck refuses more); once more for the end
SPOOL_BYTES = 1 << 20  # a body's first MiB stays in memory, the rest goes to a temporary file
UPLOAD_NAME = b"upload"  # every uploaded file's name, as BentoML gets it (see FormCheck)


def upload_limits(serve: ServeParams) -> tuple[dict[str, int], int]:
    """From the serve params: the largest body each upload endpoint takes, and the body bytes that all requests of
    one API worker may hold at once (spooled to disk past SPOOL_BYTES each, and BentoML spools its own copy while
    it parses): two full batches; a request that would go over gets 503. A longer body cannot pass FormCheck: it
    gets 413 from its Content-Length alone, before it counts against the in-flight bytes."""
    parts = {"/classify": 1, "/classify_batch": serve.max_batch_images}
    max_body = {path: n * serve.max_bytes + (n + 1) * PART_SLACK for path, n in parts.items()}
    return max_body, 2 * max_body["/classify_batch"]


MAX_BODY, IN_FLIGHT_BYTES = upload_limits(SERVE)
# decoded pixels, counted from the headers before any is decoded: serve.max_request_pixels a request (413), twice
# that for all of an API worker's (503). 32 PNGs of 73 KB that decode to 25 MP each took 13.9 s and 1.47 GB
PIXELS_IN_FLIGHT = 2 * SERVE.max_request_pixels


class BadUpload(ValueError):
    """An upload the service cannot use; `status` is the HTTP status to answer with."""

    def __init__(self, message: str, status: HTTPStatus = HTTPStatus.BAD_REQUEST):
        super().__init__(message)
        self.status = status


def error(status: HTTPStatus, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


class FormCheck:
    """Checks a multipart body as it streams in: every part a file (a filename) in the endpoint's field, at most
    `max_parts` of them, each at most serve.max_bytes with at most PART_SLACK of boundary and headers. `write` raises
    BadUpload at the first chunk that breaks a rule, `finish` if the body ends before its closing boundary (a wrong
    boundary). Both return the body written anew for BentoML: each part's file named UPLOAD_NAME, its Content-Type
    kept, other headers dropped. BentoML names its temporary file after the client's filename, and one of 245 bytes
    or more was a 500 ("File name too long"): nothing the client names reaches the disk."""

    def __init__(self, boundary: bytes, field: str, max_parts: int):
        self.boundary, self.field, self.max_parts = boundary, field, max_parts
        self.parts = self.part_bytes = 0  # python-multipart bounds each part's headers (8, of 4 KiB each)
        self.header, self.value, self.disposition, self.ended = b"", b"", b"", False
        self.content_type, self.out = b"", bytearray()  # the body written anew, until write or finish returns it
        self.read = self.data = 0  # body bytes in, and those that are files' bytes: the rest is boundaries, headers
        callbacks = {
            "on_part_begin": self.on_part_begin,
            "on_header_field": self.on_header_field,
            "on_header_value": self.on_header_value,
            "on_header_end": self.on_header_end,
            "on_headers_finished": self.on_headers_finished,
            "on_part_data": self.on_part_data,
            "on_part_end": self.on_part_end,
            "on_end": self.on_end,
        }
        self.parser = MultipartParser(boundary, callbacks)

    def write(self, chunk: bytes) -> bytes:
        try:
            self.parser.write(chunk)
        except MultipartParseError as e:
            raise BadUpload(f"malformed multipart body ({e}): is the boundary in Content-Type the body's?") from e
        self.read += len(chunk)
        if self.read - self.data > (self.parts + 1) * PART_SLACK:
            msg = f"multipart headers over {PART_SLACK} bytes a part: send each photo with its usual headers"
            raise BadUpload(msg, HTTPStatus.REQUEST_ENTITY_TOO_LARGE)
        out, self.out = bytes(self.out), bytearray()
        return out

    def finish(self) -> bytes:
        self.parser.finalize()
        if not self.ended:
            raise BadUpload(
                f"the multipart body ends before its closing boundary '--{self.boundary.decode('latin-1')}--': "
                "is the boundary in Content-Type the one the body uses?"
            )
        if not self.parts:
            raise BadUpload(f"no photo: send it as a file in the multipart field '{self.field}'")
        return bytes(self.out)

    def on_part_begin(self) -> None:
        self.parts += 1
        self.part_bytes, self.disposition, self.content_type = 0, b"", b""
        self.out += b"--%s\r\n" % self.boundary
        if self.parts > self.max_parts and self.max_parts == 1:
            raise BadUpload("more than one file: /classify takes one photo, /classify_batch several")
        if self.parts > self.max_parts:
            msg = f"over {self.max_parts} images, the limit per request"
            raise BadUpload(msg, HTTPStatus.REQUEST_ENTITY_TOO_LARGE)

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self.header += data[start:end]

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self.value += data[start:end]

    def on_header_end(self) -> None:
        if self.header.lower() == b"content-disposition":
            self.disposition = self.value
        elif self.header.lower() == b"content-type":
            self.content_type = self.value
        self.header, self.value = b"", b""

    def on_headers_finished(self) -> None:
        kind, options = parse_options_header(self.disposition)
        if kind != b"form-data" or b"name" not in options:
            raise BadUpload(
                f"part {self.parts} has no 'Content-Disposition: form-data' with a name: send the photo as a file "
                f"in the multipart field '{self.field}'"
            )
        name = options[b"name"].decode("latin-1")
        if name != self.field:
            raise BadUpload(f"unexpected field '{name}': send the photo in the field '{self.field}'")
        # a text value where a photo belongs: BentoML would take it for a URL to download (a server-side request
        # forgery), so it never gets past here
        if b"filename" not in options:
            raise BadUpload(f"field '{self.field}' holds text, not a file: upload the photo itself (multipart file)")
        self.out += b'Content-Disposition: form-data; name="%s"; filename="%s"\r\n' % (self.field.encode(), UPLOAD_NAME)
        if self.content_type:
            self.out += b"Content-Type: %s\r\n" % self.content_type
        self.out += b"\r\n"

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        self.part_bytes += end - start
        self.data += end - start
        self.out += data[start:end]
        if self.part_bytes > SERVE.max_bytes:
            which = "image" if self.max_parts == 1 else f"image {self.parts}"
            msg = f"{which} is over the limit of {SERVE.max_bytes} bytes"
            raise BadUpload(msg, HTTPStatus.REQUEST_ENTITY_TOO_LARGE)

    def on_part_end(self) -> None:
        self.out += b"\r\n"

    def on_end(self) -> None:
        self.ended = True
        self.out += b"--%s--\r\n" % self.boundary


class UploadGuard:
    """ASGI middleware in front of the upload endpoints: BentoML gets a body only once it is whole and checked.

    BentoML (and Starlette under it) read a whole body before any check, and a malformed one raised an
    HTTPException that BentoML's TimeoutMiddleware swallows: no answer for traffic.timeout (120 s), then a bare 500
    (bentoml/BentoML#5670). Here the body streams through FormCheck, written anew, into a spooled temporary file; a
    request with both Content-Length and Transfer-Encoding gets 400 on any path, a declared Content-Length over the
    limit gets 413 before a byte is read, anything that breaks a rule gets 4xx at that
    chunk (the rest is not kept), and a request that would take the worker's body bytes over IN_FLIGHT_BYTES
    gets 503. (BentoML also answers 500 to a file in an undeclared field, and takes text in a file field, or a
    JSON body, for a URL to download: only multipart files in the endpoint's field pass.)"""

    def __init__(self, app):
        self.app = app
        self.in_flight = 0  # body bytes the requests of this worker hold now (one event loop: no lock)

    async def __call__(self, scope, receive, send):
        path = scope.get("path", "")
        if scope["type"] == "http" and {b"content-length", b"transfer-encoding"} <= {k for k, _ in scope["headers"]}:
            # two framings: how a request is smuggled past a proxy that reads the other one; refuse it and close
            # the connection, on every path (RFC 9112 6.1)
            msg = "both Content-Length and Transfer-Encoding in one request: send one of them"
            return await error(HTTPStatus.BAD_REQUEST, msg, {"connection": "close"})(scope, receive, send)
        if scope["type"] != "http" or scope.get("method") != "POST" or path not in UPLOAD_FIELDS:
            return await self.app(scope, receive, send)
        spool = UploadFile(SpooledTemporaryFile(max_size=SPOOL_BYTES))
        held = 0  # this request's share of in_flight
        try:
            try:
                headers = Headers(scope=scope)
                check = self.start(headers, path)
                declared = headers.get("content-length")  # checked by start: digits, under the limit
                held = self.take(int(declared)) if declared else 0
                size = 0
                while True:
                    message = await receive()
                    # answered all the same (nobody reads it): BentoML's TimeoutMiddleware holds a request that
                    # ends unanswered for traffic.timeout, and a shutdown waits for it
                    if message["type"] == "http.disconnect":
                        raise BadUpload("the client went away before the body ended")
                    chunk = message.get("body", b"")
                    out = check.write(chunk)  # the body written anew (see FormCheck); first: its refusals say most
                    size += len(chunk)
                    if size > MAX_BODY[path]:
                        raise BadUpload(
                            f"request body over {MAX_BODY[path]} bytes: send smaller or fewer photos",
                            HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                        )
                    if size > held:  # chunked: take as it comes
                        held += self.take(size - held)
                    await spool.write(out)
                    if not message.get("more_body"):
                        break
                await spool.write(check.finish())
            except BadUpload as e:
                # no `Connection: close`: a client still sending would get a reset instead of this answer; uvicorn
                # reads the rest of the body into nothing
                headers = {"retry-after": "1"} if e.status == HTTPStatus.SERVICE_UNAVAILABLE else None
                return await error(e.status, str(e), headers)(scope, receive, send)
            # the headers of the body BentoML gets: its length, and a lower-case media type (BentoML's own test of
            # it is case-sensitive: "Multipart/Form-Data" went to its JSON reader)
            scope = {**scope, "headers": form_headers(scope["headers"], check.boundary, spool.file.tell())}
            await spool.seek(0)
            await self.app(scope, replay(spool, receive), send)
        finally:
            self.in_flight -= held
            await spool.close()

    @staticmethod
    def start(headers: Headers, path: str) -> FormCheck:
        """A FormCheck for this request, or BadUpload from its headers alone."""
        kind, options = parse_options_header(headers.get("content-type", ""))
        field = UPLOAD_FIELDS[path]
        if kind != b"multipart/form-data":
            raise BadUpload(f"send the photo as a file in the multipart/form-data field '{field}'")
        boundary = options.get(b"boundary", b"")
        if not 0 < len(boundary) <= 70:  # RFC 2046: 1 to 70 characters
            raise BadUpload("multipart/form-data without a boundary (1 to 70 characters) in Content-Type")
        declared = headers.get("content-length")
        if declared is not None and not declared.isdigit():
            raise BadUpload(f"Content-Length '{declared}' is not a number")
        if declared is not None and int(declared) > MAX_BODY[path]:
            msg = f"request body of {declared} bytes, over {MAX_BODY[path]}: send smaller or fewer photos"
            raise BadUpload(msg, HTTPStatus.REQUEST_ENTITY_TOO_LARGE)
        return FormCheck(boundary, field, MAX_PARTS[path])

    def take(self, n: int) -> int:
        """Add n bytes to this worker's in-flight bodies, or BadUpload 503 if that would go over IN_FLIGHT_BYTES."""
        if self.in_flight + n > IN_FLIGHT_BYTES:
            raise BadUpload(
                f"busy: uploads of {self.in_flight} bytes in progress, this one would go over {IN_FLIGHT_BYTES}: "
                "retry in a moment",
                HTTPStatus.SERVICE_UNAVAILABLE,
            )
        self.in_flight += n
        return n


def form_headers(headers: list, boundary: bytes, length: int) -> list:
    """ASGI request headers for a multipart body of `length` bytes with this boundary, in place of the client's."""
    framing = (b"content-type", b"content-length", b"transfer-encoding")
    return [(k, v) for k, v in headers if k not in framing] + [
        (b"content-type", b'multipart/form-data; boundary="%s"' % boundary),
        (b"content-length", b"%d" % length),
    ]


def replay(spool: UploadFile, receive):
    """An ASGI receive that gives the checked body from the spool, a MiB at a time, then the client's messages."""
    done = False

    async def next_message():
        nonlocal done
        if done:
            return await receive()  # the disconnect, when it comes
        chunk = await spool.read(SPOOL_BYTES)
        done = len(chunk) < SPOOL_BYTES
        return {"type": "http.request", "body": chunk, "more_body": not done}

    return next_message


class NoCorkOptimizer(bentoml_dispatcher.Optimizer):
    """BentoML's adaptive-batching optimizer with its cork wait held at 0: a batch leaves when the model is free.

    BentoML 1.4's CorkDispatcher holds a lone request back until it has waited `Optimizer.wait`, the mean queue
    wait of the last 50 batches' first requests. Under load that is the wait for a busy model, so after a burst
    every idle request waits it out, and logs the same wait again: it never decays (bench/load_test.py, 64 clients
    for 30 s: 0.15 s idle before, 1.31 s 1 s after, still 1.35 s 30 s after; with this, 0.03-0.04 s from 1 s after,
    and more requests/s under load). Without the cork, the requests that queue while a forward pass runs still go
    together into the next one, the batching that pays on a busy model (as Triton's default max_queue_delay, 0)."""

    def trigger_refresh(self) -> None:
        super().trigger_refresh()  # keeps the latency fit (o_a, o_b) behind the max_latency_ms refusals
        self.wait = 0


# read when the model service builds its dispatcher, after importing this module; bentoml is pinned below 1.5
bentoml_dispatcher.Optimizer = NoCorkOptimizer
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
    """The model: preprocessed images (N, 3, H, W) -> calibrated P(dog) (N,), batched across requests."""

    model = MODEL

    def __init__(self) -> None:
        use_worker_tempdir()  # before BentoML makes its client folders (serving/tempdir.py)
        self.meta = read_metadata(self.model.path)
        self.calibration = CALIBRATION
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
        """P(dog) (N,) as the submission computes it: flip TTA, temperature and clip as `package` stored them."""
        return self.calibration.predict(self.session, self.meta, images)

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

    def __init__(self) -> None:
        use_worker_tempdir()  # uploads go there, and a killed worker's are removed (serving/tempdir.py)
        guard_connections(SERVE.header_timeout_s, SERVE.body_timeout_s, SERVE.max_connections)  # before it serves
        self.meta = read_metadata(self.model.path)
        self.calibration = CALIBRATION
        self.decoding = 0  # decoded pixels this worker's requests hold now (one event loop: no lock)
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

    def check(self, upload: Path, name: str) -> int:
        """One upload's decoded pixels, from its size and header alone, or a 4xx error that says what is wrong."""
        size = upload.stat().st_size
        if size == 0:
            raise BadUpload(f"{name} is empty: send a photo (JPEG, PNG, GIF, WebP ...)")
        if size > SERVE.max_bytes:
            raise BadUpload(
                f"{name} is {size} bytes, over the limit of {SERVE.max_bytes}", HTTPStatus.REQUEST_ENTITY_TOO_LARGE
            )
        try:
            # JPEGs decode at reduced scale, to the model's resize_size, as predict decodes them
            return decoded_pixels(upload, SERVE.max_pixels, self.meta["resize_size"])
        except ImageError as e:
            raise BadUpload(f"{name}: {str(e).replace(str(upload), 'the upload')}") from e

    def load(self, upload: Path, name: str) -> np.ndarray:
        """One upload -> a preprocessed (3, H, W) array, or a 4xx error that says what is wrong."""
        self.check(upload, name)
        try:
            img = load_image(upload, SERVE.max_pixels, self.meta["resize_size"])
        except ImageError as e:
            raise BadUpload(f"{name}: {str(e).replace(str(upload), 'the upload')}") from e
        m = self.meta
        return preprocess_as(img, m)  # the model's own size, filter (bilinear, bicubic), mean and std

    async def decode(self, uploads: list[Path], names: list[str]) -> list[np.ndarray]:
        """Uploads -> preprocessed arrays, in threads (never on the event loop); every header checked before any is
        decoded, and the request's decoded pixels within serve.max_request_pixels (413) and PIXELS_IN_FLIGHT (503)."""
        pixels = sum(await asyncio.to_thread(lambda: [self.check(p, n) for p, n in zip(uploads, names, strict=True)]))
        if pixels > SERVE.max_request_pixels:
            raise BadUpload(
                f"the photos decode to {pixels} pixels, over the limit of {SERVE.max_request_pixels} a request: send "
                "fewer or smaller photos",
                HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
            )
        if self.decoding + pixels > PIXELS_IN_FLIGHT:
            raise BadUpload(
                f"busy: photos of {self.decoding} pixels are being decoded, these would go over {PIXELS_IN_FLIGHT}: "
                "retry in a moment",
                HTTPStatus.SERVICE_UNAVAILABLE,
            )
        self.decoding += pixels
        try:
            loads = (asyncio.to_thread(self.load, p, n) for p, n in zip(uploads, names, strict=True))
            return await asyncio.gather(*loads)
        finally:
            self.decoding -= pixels

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

    @staticmethod
    def answer(p_dog: float) -> dict:
        p_dog = float(p_dog)
        return {"label": "dog" if p_dog >= 0.5 else "cat", "p_dog": p_dog, "p_cat": 1.0 - p_dog}

    @bentoml.api
    async def classify(self, image: Path) -> dict:
        """One photo (multipart field `image`) -> {"label", "p_dog", "p_cat"}: the submission's calibrated P(dog)."""
        try:
            (x,) = await self.decode([image], ["image"])
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
            xs = await self.decode(images, [f"image {i + 1}" for i in range(len(images))])
        except BadUpload as e:
            return error(e.status, str(e))
        p_dog = await self.infer(np.stack(xs))
        return [self.answer(p) for p in p_dog]


DogsVsCats.add_asgi_middleware(UploadGuard)


# --- the page for people: GET / and the model facts it shows, GET /info -------------------------------
PAGE = Path(__file__).with_name("page.html")


async def page(_: Request) -> FileResponse:
    return FileResponse(PAGE, media_type="text/html")


async def model_info(_: Request) -> JSONResponse:
    """The served model's tag, its validation metrics and the calibration it applies, from the store's metadata,
    the variant the model worker runs, and whether P(dog) is the submission's: the same variant, and a submission
    made of this model alone."""
    service = bentoml.get_current_service()  # the DogsVsCats instance of this worker
    model = service.model
    meta = model.info.metadata
    member = model.info.labels.get("member")
    info = {
        "name": model.tag.name,
        "version": model.tag.version,
        "created": model.info.creation_time.isoformat(),
        "member": member,
        "evaluate": meta.get("evaluate"),  # the member's own validation figures
        "export": meta.get("export"),
        "calibration": service.calibration.as_dict(),  # applied to every answer, as predict does
        "submission_members": meta.get("submission_members"),
    }
    running = await service.running_variant()
    if running is None:
        return JSONResponse({**info, "variant": None, "provider": None, "same_as_submission": None,
                             "note": "the model service is not answering yet: ask again in a moment"})  # fmt: skip
    submission = submission_variant(meta.get("predict_variant", "auto"), running["provider"], Path(model.path))
    alone = meta.get("submission_members") == [member or "model"]
    same = alone and running["variant"] == submission
    if same:
        note = "P(dog) is the submission's: same model file, TTA and calibration"
    elif not alone:
        note = (f"the submission blends {', '.join(meta.get('submission_members') or [])}; this service runs "
                f"{member} alone, with its own calibration: P(dog) is that member's, not the submission's")  # fmt: skip
    else:
        note = (f"this service runs {running['variant']}, the submission {submission}: P(dog) differs from the "
                "submission's within export's check of that variant (export.json); set serve.variant to "
                f"{submission} for the submission's own")  # fmt: skip
    return JSONResponse({**info, **running, "submission_variant": submission, "same_as_submission": same,
                         "note": note})  # fmt: skip


def submission_variant(setting: str, provider: str, model_path: Path) -> str:
    """The model file predict used for the submission, from predict.variant (auto: fp16 on CUDA if export kept it,
    else fp32; never int8): what the same provider gives."""
    return auto_variant(model_path, provider == "cuda", "fp32") if setting == "auto" else setting


# Mounted at "/": BentoML's PassiveMount only claims the paths this app has a route for, so the APIs,
# /livez, /readyz and /metrics are untouched, and GET / comes before BentoML's own index page.
DogsVsCats.mount_asgi_app(Starlette(routes=[Route("/", page), Route("/info", model_info)]), path="/", name="page")
