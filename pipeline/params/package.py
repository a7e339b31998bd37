"""The package section: what goes into the BentoML model store.

One frozen dataclass per section of params.yaml; `pipeline.config.load_params` fills it, checking every key and
type. A stage depends (dvc.yaml) on the modules here that it reads, so a change to another section's fields reruns
nothing of it."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PackageParams:
    model_name: str  # name in the BentoML model store (`bentoml models list`)
    member: str  # the member served: "best" (lowest validation log loss after calibration) or a member's name
