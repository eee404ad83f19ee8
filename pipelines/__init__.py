"""Data pipelines: manifest + label split -> typed `Batch` on the device (FFCV or DALI)."""
