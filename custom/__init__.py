"""RETINA building blocks referenced by the bundle configs via ``_target_``."""
