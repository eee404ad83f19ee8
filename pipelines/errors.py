"""The one error type pipelines raise for unusable input."""

from __future__ import annotations


class PipelineError(ValueError):
    """A dataset folder, file or setting a pipeline cannot use; the message says which and why."""
