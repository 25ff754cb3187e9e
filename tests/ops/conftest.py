"""Ops tests reuse the service fixtures (tiny torch-free bundle, in-process client)."""

from ..service.conftest import client, make_client, make_settings, tiny_bundle  # noqa: F401
