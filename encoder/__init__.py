"""Embedding: normalised image crops → L2-normalised 512-d vectors, one model per process.

Importing this package builds nothing; ``build_encoder(settings).load()`` does, once, in the
worker process (after fork).
"""

from __future__ import annotations

from config.settings import EncoderSettings
from encoder.checkpoint import save_checkpoint
from encoder.encoder import Encoder, model_version_for
from encoder.model import EMBEDDING_DIM, EmbeddingNet
from encoder.registry import get_backbone, known_backbones, register_backbone

__all__ = [
    "EMBEDDING_DIM",
    "EmbeddingNet",
    "Encoder",
    "build_encoder",
    "get_backbone",
    "known_backbones",
    "model_version_for",
    "register_backbone",
    "save_checkpoint",
]


def build_encoder(settings: EncoderSettings) -> Encoder:
    """An unloaded Encoder for ``settings`` (cheap: validates names, builds no model)."""
    return Encoder(settings)
