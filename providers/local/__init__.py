"""The local Diffusers backend: a model catalog, a pipeline cache, one worker per device.

Importing this package never imports torch or diffusers; they load on first use.
"""

from __future__ import annotations

from providers.local.catalog import Catalog, ModelEntry
from providers.local.pipelines import ModelNotAvailable, PipelineCache, UnsafeCheckpoint
from providers.local.provider import LocalProvider

__all__ = ["Catalog", "LocalProvider", "ModelEntry", "ModelNotAvailable", "PipelineCache", "UnsafeCheckpoint"]
