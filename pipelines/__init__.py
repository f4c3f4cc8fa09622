"""Kubeflow Pipelines wiring of the fersynth stages (`python -m pipelines --help`)."""
