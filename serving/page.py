"""The page for people and the model's facts: `GET /` (serving/page.html) and `GET /info`, mounted on the service.

`GET /info` gives the served model's tag, its validation metrics and the calibration it applies, from the store's
metadata, the variant the model worker runs, and whether P(dog) is the submission's. `app()` is the Starlette app the
service mounts at "/": BentoML's PassiveMount only claims the paths it has a route for, so the APIs, /livez, /readyz
and /metrics are untouched, and GET / comes before BentoML's own index page.
"""

from __future__ import annotations

from pathlib import Path

import bentoml
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse
from starlette.routing import Route

from pipeline.data import auto_variant

PAGE = Path(__file__).with_name("page.html")


async def page(_: Request) -> FileResponse:
    return FileResponse(PAGE, media_type="text/html")


async def model_info(_: Request) -> JSONResponse:
    """The served model's tag, its validation metrics and the calibration it applies, from the store's metadata,
    the variant the model worker runs, and whether P(dog) is the submission's: the same variant, and a submission
    made of this model alone."""
    service = bentoml.get_current_service()  # the DogsVsCats instance of this worker
    model = service.model
    meta = model.info.metadata
    member = model.info.labels.get("member")
    info = {
        "name": model.tag.name,
        "version": model.tag.version,
        "created": model.info.creation_time.isoformat(),
        "member": member,
        "evaluate": meta.get("evaluate"),  # the member's own validation figures
        "export": meta.get("export"),
        "calibration": service.contract.calibration.as_dict(),  # applied to every answer, as predict does
        "submission_members": meta.get("submission_members"),
    }
    running = await service.running_variant()
    if running is None:
        return JSONResponse({**info, "variant": None, "provider": None, "same_as_submission": None,
                             "note": "the model service is not answering yet: ask again in a moment"})  # fmt: skip
    submission = submission_variant(service.contract.variant, running["provider"], Path(model.path))
    alone = meta.get("submission_members") == [member or "model"]
    same = alone and running["variant"] == submission
    if same:
        note = "P(dog) is the submission's: same model file, TTA and calibration"
    elif not alone:
        note = (f"the submission blends {', '.join(meta.get('submission_members') or [])}; this service runs "
                f"{member} alone, with its own calibration: P(dog) is that member's, not the submission's")  # fmt: skip
    else:
        note = (f"this service runs {running['variant']}, the submission {submission}: P(dog) differs from the "
                "submission's within export's check of that variant (export.json); set serve.variant to "
                f"{submission} for the submission's own")  # fmt: skip
    return JSONResponse({**info, **running, "submission_variant": submission, "same_as_submission": same,
                         "note": note})  # fmt: skip


def submission_variant(setting: str, provider: str, model_path: Path) -> str:
    """The model file predict used for the submission, from predict.variant (auto: fp16 on CUDA if export kept it,
    else fp32; never int8): what the same provider gives."""
    return auto_variant(model_path, provider == "cuda", "fp32") if setting == "auto" else setting


def app() -> Starlette:
    return Starlette(routes=[Route("/", page), Route("/info", model_info)])
