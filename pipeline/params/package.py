"""The package section: what goes into the BentoML model store."""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.config import matching
from pipeline.params.train import MEMBER_NAME

# BentoML's own rule for a tag's name (bentoml/_internal/tag.py): it names the model's folder in the store
BENTOML_NAME = r"(?=.{1,63}$)[a-z0-9]([-._a-z0-9]*[a-z0-9])?"


@dataclass(frozen=True)
class PackageParams:
    # its name in the BentoML model store (`bentoml models list`)
    model_name: str = matching(BENTOML_NAME, "a BentoML model name: a-z, 0-9, - _ . inside, at most 63")
    # the member served: "best" (lowest validation log loss after calibration) or a member's name
    member: str = matching(f"best|{MEMBER_NAME.pattern}", "best or a member's name")
