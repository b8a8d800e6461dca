"""`serve(settings)`: run the gateway with uvicorn (what `fsar serve` calls).

With one worker the app object is handed to uvicorn directly. With `workers > 1` uvicorn needs an
import string: the settings travel to the worker processes as JSON in the environment variable
`FSAR_SETTINGS_JSON`, and each worker builds its app with the factory `service.server:app_from_env`.
"""
from __future__ import annotations

import logging
import os

from fastapi import FastAPI

from service.settings import Settings

SETTINGS_ENV = "FSAR_SETTINGS_JSON"
APP_FACTORY = "service.server:app_from_env"


def app_from_env() -> FastAPI:
    """App factory for uvicorn workers: settings from `FSAR_SETTINGS_JSON`, else from `FSAR_*`."""
    from service.api import create_app

    raw = os.environ.get(SETTINGS_ENV)
    settings = Settings.model_validate_json(raw) if raw else Settings()
    _setup_logging(settings)
    return create_app(settings)


def _preflight(settings: Settings) -> None:
    """Fail before uvicorn starts when the embedded model's backbone weights cannot be had.

    Inside uvicorn the same error would arrive wrapped in a start-up traceback; here it reaches the
    CLI as one actionable sentence. (Checkpoints are checked by `load_checkpoint` at start-up.)
    """
    if settings.backend != "embedded" or settings.checkpoint:
        return
    from training.model.backbone import check_pretrained_available

    check_pretrained_available(settings.backbone, settings.pretrained)


def _setup_logging(settings: Settings) -> None:
    logging.basicConfig(level=settings.log_level_number,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("service").setLevel(settings.log_level_number)
    logging.getLogger("training").setLevel(settings.log_level_number)


def serve(settings: Settings) -> None:
    """Run the HTTP server until interrupted. A model that cannot load, or an unusable API key
    configuration (`SystemExit` with one sentence, before anything starts), stops it at start-up."""
    import uvicorn

    from service.auth import KeyConfigError, load_key_ring

    try:
        load_key_ring(settings)  # every worker reads the keys again; fail once, clearly, here
    except KeyConfigError as err:
        raise SystemExit(f"fsar serve: {err}") from None
    _setup_logging(settings)
    _preflight(settings)
    log = logging.getLogger("service.server")
    log.info("fsar gateway on http://%s:%d (backend=%s, workers=%d)", settings.host, settings.port,
             settings.backend, settings.workers)
    common = dict(host=settings.host, port=settings.port, log_level=settings.log_level,
                  lifespan="on", timeout_graceful_shutdown=10)
    if settings.workers == 1:
        from service.api import create_app

        uvicorn.run(create_app(settings), **common)
        return
    os.environ[SETTINGS_ENV] = settings.model_dump_json()
    uvicorn.run(APP_FACTORY, factory=True, workers=settings.workers, **common)
