"""Uploaded photos to model inputs: each checked from its size and header before any is decoded, within pixel budgets.

`PhotoDecoder` (one per API worker, serving/service.py) turns a request's uploads into preprocessed arrays in
threads, never on the event loop: every upload's decoded pixels are counted from its header first, a request's within
serve.max_request_pixels (413) and all of the worker's requests within twice that (503); then each is decoded and
preprocessed as `predict` does (pipeline/contract.py), or refused with a `BadUpload` that says what is wrong.
"""

from __future__ import annotations

import asyncio
from http import HTTPStatus
from pathlib import Path

import numpy as np

from pipeline.contract import ModelContract
from pipeline.data import ImageError, decoded_pixels, load_image
from pipeline.params.serve import ServeParams
from serving.upload_guard import BadUpload


class PhotoDecoder:
    """Decodes uploads into the inputs of the model whose contract is `contract`: the crops its TTA averages, as
    predict makes them, within the serve params' limits."""

    def __init__(self, serve: ServeParams, contract: ModelContract):
        self.serve, self.contract = serve, contract
        self.draft_size = max(contract.crop_sizes)  # JPEGs decode at reduced scale, to the largest crop's (predict's)
        # 32 PNGs of 73 KB that decode to 25 MP each took 13.9 s and 1.47 GB: pixels are budgeted before decoding
        self.pixels_in_flight = 2 * serve.max_request_pixels
        self.decoding = 0  # decoded pixels this worker's requests hold now (one event loop: no lock)

    def check(self, upload: Path, name: str) -> int:
        """One upload's decoded pixels, from its size and header alone, or a 4xx error that says what is wrong."""
        size, max_bytes = upload.stat().st_size, self.serve.max_bytes
        if size == 0:
            raise BadUpload(f"{name} is empty: send a photo (JPEG, PNG, GIF, WebP ...)")
        if size > max_bytes:
            msg = f"{name} is {size} bytes, over the limit of {max_bytes}"
            raise BadUpload(msg, HTTPStatus.REQUEST_ENTITY_TOO_LARGE)
        try:
            return decoded_pixels(upload, self.serve.max_pixels, self.draft_size)
        except ImageError as e:
            raise BadUpload(f"{name}: {str(e).replace(str(upload), 'the upload')}") from e

    def load(self, upload: Path, name: str) -> np.ndarray:
        """One upload -> a preprocessed (3, H, W) array (or its crops, (K, 3, H, W)), or a 4xx error that says what is
        wrong."""
        self.check(upload, name)
        try:
            img = load_image(upload, self.serve.max_pixels, self.draft_size)
        except ImageError as e:
            raise BadUpload(f"{name}: {str(e).replace(str(upload), 'the upload')}") from e
        return self.contract.inputs(img)  # the model's own size, filter, mean and std

    async def decode(self, uploads: list[Path], names: list[str]) -> list[np.ndarray]:
        """Uploads -> preprocessed arrays, in threads; every header checked before any is decoded, and the request's
        decoded pixels within serve.max_request_pixels (413) and the worker's budget (503)."""
        pixels = sum(await asyncio.to_thread(lambda: [self.check(p, n) for p, n in zip(uploads, names, strict=True)]))
        if pixels > self.serve.max_request_pixels:
            raise BadUpload(
                f"the photos decode to {pixels} pixels, over the limit of {self.serve.max_request_pixels} a request: "
                "send fewer or smaller photos",
                HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
            )
        if self.decoding + pixels > self.pixels_in_flight:
            raise BadUpload(
                f"busy: photos of {self.decoding} pixels are being decoded, these would go over "
                f"{self.pixels_in_flight}: retry in a moment",
                HTTPStatus.SERVICE_UNAVAILABLE,
            )
        self.decoding += pixels
        try:
            loads = (asyncio.to_thread(self.load, p, n) for p, n in zip(uploads, names, strict=True))
            return await asyncio.gather(*loads)
        finally:
            self.decoding -= pixels
