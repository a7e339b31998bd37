"""The upload guard: ASGI middleware that checks each upload's body as it streams in, before BentoML reads it.

`UploadGuard` sits in front of the service's upload endpoints (serving/service.py adds it with the serve params):
the form, the part count and sizes are checked chunk by chunk by `FormCheck`, which writes the body anew, and it is
spooled to disk, so no body is whole in memory; a bad one gets a 4xx JSON answer that says what is wrong.
"""

from __future__ import annotations

from http import HTTPStatus
from tempfile import SpooledTemporaryFile

from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.datastructures import Headers, UploadFile
from starlette.responses import JSONResponse

from pipeline.params.serve import ServeParams

UPLOAD_FIELDS = {"/classify": "image", "/classify_batch": "images"}  # endpoint -> its multipart field
PART_SLACK = 8 << 10  # a part's boundary line and headers, at most (FormCheck refuses more); once more for the end
SPOOL_BYTES = 1 << 20  # a body's first MiB stays in memory, the rest goes to a temporary file
UPLOAD_NAME = b"upload"  # every uploaded file's name, as BentoML gets it (see FormCheck)


class BadUpload(ValueError):
    """An upload the service cannot use; `status` is the HTTP status to answer with."""

    def __init__(self, message: str, status: HTTPStatus = HTTPStatus.BAD_REQUEST):
        super().__init__(message)
        self.status = status


def error(status: HTTPStatus, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def max_parts(serve: ServeParams) -> dict[str, int]:
    """Endpoint -> the files one request may hold."""
    return {"/classify": 1, "/classify_batch": serve.max_batch_images}


def upload_limits(serve: ServeParams) -> tuple[dict[str, int], int]:
    """From the serve params: the largest body each upload endpoint takes, and the body bytes that all requests of
    one API worker may hold at once (spooled to disk past SPOOL_BYTES each, and BentoML spools its own copy while
    it parses): two full batches; a request that would go over gets 503. A longer body cannot pass FormCheck: it
    gets 413 from its Content-Length alone, before it counts against the in-flight bytes."""
    max_body = {path: n * serve.max_bytes + (n + 1) * PART_SLACK for path, n in max_parts(serve).items()}
    return max_body, 2 * max_body["/classify_batch"]


class FormCheck:
    """Checks a multipart body as it streams in: every part a file (a filename) in the endpoint's field, at most
    `max_parts` of them, each at most `max_bytes` with at most PART_SLACK of boundary and headers. `write` raises
    BadUpload at the first chunk that breaks a rule, `finish` if the body ends before its closing boundary (a wrong
    boundary). Both return the body written anew for BentoML: each part's file named UPLOAD_NAME, its Content-Type
    kept, other headers dropped. BentoML names its temporary file after the client's filename, and one of 245 bytes
    or more was a 500 ("File name too long"): nothing the client names reaches the disk."""

    def __init__(self, boundary: bytes, field: str, max_parts: int, max_bytes: int):
        self.boundary, self.field, self.max_parts, self.max_bytes = boundary, field, max_parts, max_bytes
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
        if self.part_bytes > self.max_bytes:
            which = "image" if self.max_parts == 1 else f"image {self.parts}"
            msg = f"{which} is over the limit of {self.max_bytes} bytes"
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
    chunk (the rest is not kept), and a request that would take the worker's body bytes over `upload_limits`' bound
    gets 503. The limits come from the serve params (`DogsVsCats.add_asgi_middleware(UploadGuard, serve=...)`).
    (BentoML also answers 500 to a file in an undeclared field, and takes text in a file field, or a
    JSON body, for a URL to download: only multipart files in the endpoint's field pass.)"""

    def __init__(self, app, serve: ServeParams):
        self.app = app
        self.max_body, self.in_flight_bytes = upload_limits(serve)
        self.max_parts = max_parts(serve)
        self.max_bytes = serve.max_bytes
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
                    if size > self.max_body[path]:
                        raise BadUpload(
                            f"request body over {self.max_body[path]} bytes: send smaller or fewer photos",
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

    def start(self, headers: Headers, path: str) -> FormCheck:
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
        if declared is not None and int(declared) > self.max_body[path]:
            msg = f"request body of {declared} bytes, over {self.max_body[path]}: send smaller or fewer photos"
            raise BadUpload(msg, HTTPStatus.REQUEST_ENTITY_TOO_LARGE)
        return FormCheck(boundary, field, self.max_parts[path], self.max_bytes)

    def take(self, n: int) -> int:
        """Add n bytes to this worker's in-flight bodies, or BadUpload 503 if that would go over its bound."""
        if self.in_flight + n > self.in_flight_bytes:
            raise BadUpload(
                f"busy: uploads of {self.in_flight} bytes in progress, this one would go over {self.in_flight_bytes}: "
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
