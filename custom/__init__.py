"""RETINA building blocks referenced by the bundle configs via ``_target_``.

Importing ``custom`` imports its parts, so a config's ``"$import custom"`` is enough for the
``$`` expressions that call them (``custom.io.pair_images_labels(...)``); ``_target_`` strings
are resolved by MONAI either way.
"""

from . import (  # noqa: F401  (in dependency order: each imports only those above it)
    utils,
    errors,
    devices,
    networks,
    checkpoints,
    io,
    transforms,
    losses,
    metrics,
    intensity,
    synthetic,
    overlays,
    settings,
    preflight,
    handlers,
    runs,
    inference,
)
