"""params.yaml's sections as typed dataclasses, one module per stage (or group of stages that read them).

One frozen dataclass per section; `pipeline.config.load_params` fills it, checking every key and type. A stage
depends (dvc.yaml) on the modules here that it reads, so a change to another section's fields reruns nothing of it.
"""
