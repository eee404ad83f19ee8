"""One entry point for every pipeline backend; each backend is imported only when chosen."""

from __future__ import annotations

import importlib

BACKENDS = {
    "ffcv": ("pipelines.ffcv_pipeline", "FFCVPipeline"),
    "dali": ("pipelines.dali_pipeline", "DALIPipeline"),
    "synthetic": ("pipelines.synthetic", "SyntheticPipeline"),
}


def pipeline_class(name: str) -> type:
    """The pipeline class of a backend name (ffcv | dali | synthetic)."""
    if name not in BACKENDS:
        raise ValueError(f"unknown pipeline {name!r}; choose from {', '.join(BACKENDS)}")
    module, cls = BACKENDS[name]
    return getattr(importlib.import_module(module), cls)


def build_pipeline(name: str, data_dir, data, aug, labeled, **kwargs):
    """Builds backend `name` with the common signature:
    `(data_dir, data, aug, labeled, *, device, dtype, rank, world_size, seed, ...)`."""
    return pipeline_class(name)(data_dir, data, aug, labeled, **kwargs)
