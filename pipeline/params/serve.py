"""The serve section: the BentoML service (no pipeline stage reads it)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pipeline.config import above, at_least


@dataclass(frozen=True)
class ServeParams:
    provider: Literal["auto", "cpu", "cuda"]  # ONNX Runtime provider: auto = CUDA when really obtained
    max_batch_size: int = at_least(1)  # adaptive batching: the most images in one forward pass
    max_latency_ms: int = at_least(1)  # adaptive batching: the longest a request may wait for its batch
    max_bytes: int = at_least(1)  # uploads larger than this get 413
    # images that decode to more pixels (JPEGs: at reduced scale) get 400 (decompression bombs)
    max_pixels: int = at_least(1)
    # decoded pixels of one request (413 past it); an API worker decodes twice this at most
    max_request_pixels: int = at_least(1)
    max_batch_images: int = at_least(1)  # images in one /classify_batch request
    variant: Literal["auto", "fp32", "int8", "fp16"]  # auto: fp16 on CUDA, int8 on CPU, if they passed export
    threads: int = at_least(0)  # ONNX Runtime intra-op threads of each model worker; 0 = one per core
    workers: int = at_least(1)  # model service processes, each with its own copy of the model and its own batches
    # a request's headers must arrive within this (slowloris), or the connection is closed
    header_timeout_s: float = above(0)
    body_timeout_s: float = above(0)  # ... and then its body must not stall (no byte) for longer than this
    # open connections per API worker: requests past it get 503, connections past twice it close
    max_connections: int = at_least(1)
