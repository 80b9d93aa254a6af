"""The agent API (Tornado): `make_app(ApiSettings)`; `ganymede-api` runs it."""
from .handlers import ApiSettings, make_app

__all__ = ["ApiSettings", "make_app"]
