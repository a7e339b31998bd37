"""The DVC stages, one module per `dvc.yaml` entry: `python -m pipeline.stages.<stage>` (run by `dvc repro`)."""
