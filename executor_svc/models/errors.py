"""Errors raised while building a model or loading its weights; both name what to change."""

from __future__ import annotations


class UnsupportedModelError(ValueError):
    """A model architecture, config field or value this server does not implement."""


class CheckpointError(ValueError):
    """A checkpoint that does not fit the model: unknown, missing or misshapen tensors."""
