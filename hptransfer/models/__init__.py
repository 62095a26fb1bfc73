"""The paper's networks: the progressive generator, the local discriminators, VGG-16 features and the
garment transfer's appearance flow network."""
from __future__ import annotations

from hptransfer.models.appearance_flow import AppearanceFlow  # noqa: F401
from hptransfer.models.discriminator import LocalDiscriminator  # noqa: F401
from hptransfer.models.generator import Generator  # noqa: F401
from hptransfer.models.vgg import VGG16Features, find_weights  # noqa: F401

__all__ = ["AppearanceFlow", "Generator", "LocalDiscriminator", "VGG16Features", "find_weights"]
