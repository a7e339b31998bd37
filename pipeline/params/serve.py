"""The serve section: the BentoML service (no pipeline stage reads it)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class ServeParams:
    provider: Literal["auto", "cpu", "cuda"]  # ONNX Runtime provider: auto = CUDA when really obtained
    max_batch_size: int  # adaptive batching: the most images in one forward pass
    max_latency_ms: int  # adaptive batching: the longest a request may wait for its batch
    max_bytes: int  # uploads larger than this get 413
    max_pixels: int  # images with more pixels get 400 (decompression bombs)
    max_batch_images: int  # images in one /classify_batch request
    variant: Literal["auto", "fp32", "int8", "fp16"]  # auto: fp16 on CUDA, int8 on CPU, if they passed export
    threads: int  # ONNX Runtime intra-op threads of each model worker; 0 = one per core
    workers: int  # model service processes, each with its own copy of the model and its own batches
