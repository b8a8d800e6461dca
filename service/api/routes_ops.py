"""Operations: `/healthz`, `/readyz`, `/metrics`, `/model`."""
from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse

from service.api.deps import get_service, get_tenant
from service.api.schemas import ErrorResponse, Health, ModelCard, Readiness
from service.core import FsarService
from service.errors import ServiceUnavailable, render

router = APIRouter(tags=["operations"])


@router.get("/healthz", response_model=Health, summary="The process is alive")
async def healthz() -> dict:
    return {"status": "ok"}


@router.get("/readyz", response_model=Readiness, responses={503: {"model": ErrorResponse}},
            summary="Backend and store are reachable")
async def readyz(request: Request) -> Response:
    """Ready when the backend (with several Triton servers: at least one of them) and the store answer.

    With several Triton servers (or a `dns:///` target) `checks.triton_servers` lists each one: url,
    state (up, down, mismatch, unusable, starting), healthy, in_flight, last_error, fingerprint, requests.
    """
    service: FsarService | None = getattr(request.app.state, "service", None)
    checks: dict[str, Any]
    if service is None:
        checks = {"backend": "starting", "store": "starting"}
    else:
        checks = dict(await service.readiness())
        if getattr(service.backend, "pooled", False):
            checks["triton_servers"] = service.backend.server_states()
    verdicts = {name: value for name, value in checks.items() if isinstance(value, str)}
    if all(value == "ok" for value in verdicts.values()):
        return JSONResponse({"status": "ready", "checks": checks})
    failing = "; ".join(f"{name}: {value}" for name, value in verdicts.items() if value != "ok")
    return render(ServiceUnavailable(f"Not ready: {failing}", code="not_ready"),
                  extra={"status": "not_ready", "checks": checks})


@router.get("/metrics", summary="Prometheus metrics", response_class=Response)
async def metrics(request: Request) -> Response:
    registry = request.app.state.metrics
    service: FsarService | None = getattr(request.app.state, "service", None)
    registry.triton_servers.source = getattr(service.backend, "server_states", None) if service else None
    return Response(registry.render(), media_type=registry.content_type)


@router.get("/model", response_model=ModelCard, summary="The model being served", dependencies=[Depends(get_tenant)],
            responses={status: {"model": ErrorResponse} for status in (401, 429, 503)})
async def model(service: Annotated[FsarService, Depends(get_service)]) -> dict:
    """Needs an API key when keys are configured (it names checkpoints and the store)."""
    return service.model_card()
