"""The fetch section: where the competition data comes from (and the demo data set's recipe)."""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.config import at_least, interval, matching, text


@dataclass(frozen=True)
class DemoParams:
    seed: int = at_least(0)  # the generator's seed: same seed, byte-identical zip
    train_per_class: int = at_least(1)  # cat.N.jpg and dog.N.jpg images each in train.zip
    test_count: int = at_least(1)  # N.jpg images in test.zip
    min_side: int = at_least(8)  # shortest image side in pixels (each image draws its own size)
    max_side: int = at_least(8)  # longest image side in pixels (>= min_side)
    mislabel_fraction: float = interval("[0, 0.5)")  # drawn as one class, named as the other (label noise)
    hard_fraction: float = interval("[0, 1]")  # images with a small, faint or partly hidden subject

    def conflict(self) -> str | None:
        if self.max_side < self.min_side:
            return f"max_side ({self.max_side}) must be >= min_side ({self.min_side})"
        return None


@dataclass(frozen=True)
class FetchParams:
    source: str = text()  # "kaggle", "demo", or a path to the competition zip or a folder holding its files
    competition: str = matching(r"[a-z0-9]+(-[a-z0-9]+)*", "a Kaggle competition's slug, as in its URL")  # Kaggle's
    demo: DemoParams  # the synthetic data set written when source is "demo"
