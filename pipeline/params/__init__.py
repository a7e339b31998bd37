"""params.yaml's sections as typed dataclasses, one module per stage (or group of stages that read them)."""
