"""The prepare section: the seeded validation split and what images are accepted."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PrepareParams:
    seed: int  # seed of the train/valid/sample split
    valid_per_class: int  # images per class moved from train to valid (the lesson: 1000) ...
    valid_fraction: float  # ... or this fraction of each class's images, if that is more (make offline: 0.1)
    sample_train_per_class: int  # images per class in sample/train (linked from train)
    sample_valid_per_class: int  # images per class in sample/valid (linked from valid)
    max_pixels: int  # larger images are rejected as decompression bombs
    workers: int  # processes that decode-check images; 0 = one per CPU core

    def valid_size(self, class_images: int) -> int:
        """Validation images taken from a class of `class_images`: valid_per_class, or valid_fraction of them."""
        return max(self.valid_per_class, round(self.valid_fraction * class_images))
