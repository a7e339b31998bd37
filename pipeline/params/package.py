"""The package section: what goes into the BentoML model store."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PackageParams:
    model_name: str  # name in the BentoML model store (`bentoml models list`)
    member: str  # the member served: "best" (lowest validation log loss after calibration) or a member's name
