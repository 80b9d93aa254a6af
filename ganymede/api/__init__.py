"""The agent API (Tornado): `make_app(ApiSettings)`; `ganymede-api` runs it."""
from .base import ApiSettings
from .handlers import make_app

__all__ = ["ApiSettings", "make_app"]
