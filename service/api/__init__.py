"""The HTTP API: `create_app(settings)` builds the FastAPI app (routers per resource)."""
from service.api.app import create_app

__all__ = ["create_app"]
