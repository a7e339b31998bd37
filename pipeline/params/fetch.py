"""The fetch section: where the competition data comes from (and the demo data set's recipe)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DemoParams:
    seed: int  # the generator's seed: same seed, byte-identical zip
    train_per_class: int  # cat.N.jpg and dog.N.jpg images each in train.zip
    test_count: int  # N.jpg images in test.zip
    min_side: int  # shortest image side in pixels (each image draws its own size)
    max_side: int  # longest image side in pixels
    mislabel_fraction: float  # images drawn as one class but named as the other (label noise)
    hard_fraction: float  # images with a small, faint or partly hidden subject


@dataclass(frozen=True)
class FetchParams:
    source: str  # "kaggle", "demo", or a path to the competition zip or a folder holding its files
    competition: str  # Kaggle competition slug
    demo: DemoParams  # the synthetic data set written when source is "demo"
