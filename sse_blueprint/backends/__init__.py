"""Backends shared between workers: ``redis`` (the engine's ports, implemented over Redis)."""
