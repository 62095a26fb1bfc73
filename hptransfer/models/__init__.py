"""The paper's networks: the progressive generator, the local discriminators and VGG-16 features."""
from __future__ import annotations

from hptransfer.models.discriminator import LocalDiscriminator  # noqa: F401
from hptransfer.models.generator import Generator  # noqa: F401
from hptransfer.models.vgg import VGG16Features, find_weights  # noqa: F401

__all__ = ["Generator", "LocalDiscriminator", "VGG16Features", "find_weights"]
