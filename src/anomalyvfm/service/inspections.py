"""The service's side of the inspection store (`serve --store URL`): recording each verdict, the history
and feedback API, and the store's health in `/health/ready` and `/metrics`.

* Every scored image becomes one record (`Inspection`), written by the store's `Recorder` before the answer
  is sent: into the store, or — while the store fails — into the spill file, so the verdict never waits on
  a broken database and never turns into an error because of one.
* `GET /inspections` (filters, newest first, paginated), `GET /inspections/{id}`,
  `GET /inspections/{id}/image` (the kept image) and `POST /inspections/{id}/label` need the API key when
  one is set, like `/predict`. A store that does not answer is 503 with `Retry-After`; an unknown id 404.
"""
from __future__ import annotations

from datetime import datetime
from typing import Any, Callable, Literal

import sqlalchemy as sa
from fastapi import APIRouter, HTTPException, Query, Request
from fastapi.responses import FileResponse
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from anomalyvfm.store import Filters, InspectionStore, Recorder, UnknownInspection
from anomalyvfm.store.database import reason
from anomalyvfm.store.inspections import MAX_PAGE
from anomalyvfm.service.schemas import ErrorResponse
from anomalyvfm.service.worker import RETRY_AFTER


class LabelRequest(BaseModel):
    label: Literal["good", "defect"] = Field(description="the operator's judgement of the part")
    note: str | None = Field(None, max_length=2000, description="free text, e.g. what the defect is")
    by: str | None = Field(None, max_length=255, description="who labelled it (default: the client's address)")


class InspectionPage(BaseModel):
    inspections: list[dict[str, Any]] = Field(description="records, newest first: id, time, source, score, "
                                                          "is_anomalous, model_version, label and the rest")
    total: int = Field(description="records matching the filters")
    limit: int
    offset: int


def recorder_for(store: InspectionStore, metrics: Any) -> Recorder:
    """The store's `Recorder`, its state exposed as gauges in the service's Prometheus registry (when
    prometheus-client is there)."""
    recorder = Recorder(store)
    if metrics.enabled:
        store_metrics(metrics, recorder)
    return recorder


def store_metrics(metrics: Any, recorder: Recorder) -> None:
    prom, registry = metrics._prom, metrics.registry
    prom.Gauge("anomalyvfm_store_degraded", "1 while records go to the spill file instead of the store",
               registry=registry).set_function(lambda: float(recorder.degraded))
    prom.Gauge("anomalyvfm_store_records_waiting", "records in the spill file waiting for the store",
               registry=registry).set_function(lambda: recorder.spill.waiting)
    for outcome in recorder.counts:  # stored, spilled, replayed, lost (this process, since it started)
        prom.Gauge(f"anomalyvfm_store_records_{outcome}", f"records {outcome} since the service started",
                   registry=registry).set_function(lambda outcome=outcome: recorder.counts[outcome])


async def call(store_call: Callable[..., Any], *args: Any) -> Any:
    """A store query off the event loop; an unknown id is 404, a store that does not answer 503."""
    try:
        return await run_in_threadpool(store_call, *args)
    except UnknownInspection as exc:
        raise HTTPException(404, str(exc)) from None
    except sa.exc.SQLAlchemyError as exc:
        raise HTTPException(503, f"inspection store unavailable ({reason(exc)}); retry shortly",
                            headers=RETRY_AFTER) from None


def inspection_routes(store: InspectionStore, dependencies: list[Any]) -> APIRouter:
    """The history and feedback API over `store` (module doc)."""
    errors: dict[int | str, dict[str, Any]] = {code: {"model": ErrorResponse} for code in (401, 404, 422, 503)}
    router = APIRouter(prefix="/inspections", dependencies=dependencies, responses=errors, tags=["inspections"])

    @router.get("", response_model=InspectionPage, summary="Stored inspections, newest first")
    async def list_inspections(
        since: datetime | None = Query(None, description="from this time on (ISO 8601; UTC if no offset)"),
        until: datetime | None = Query(None, description="before this time"),
        verdict: Literal["anomalous", "normal"] | None = None,
        label: Literal["good", "defect", "none"] | None = Query(None, description="none: not labelled yet"),
        model_version: str | None = None,
        limit: int = Query(100, ge=1, le=MAX_PAGE), offset: int = Query(0, ge=0),
    ) -> dict[str, Any]:
        filters = Filters(since, until, verdict, label, model_version)
        items, total = await call(store.find, filters, limit, offset)
        return {"inspections": items, "total": total, "limit": limit, "offset": offset}

    @router.get("/{inspection_id}", summary="One stored inspection")
    async def get_inspection(inspection_id: str) -> dict[str, Any]:
        return await call(store.get, inspection_id)

    @router.get("/{inspection_id}/image", summary="The kept image of an inspection", response_class=FileResponse)
    async def get_image(inspection_id: str) -> FileResponse:
        record = await call(store.get, inspection_id)
        path = store.images.path(record["sha256"]) if store.images else None
        if path is None:
            raise HTTPException(404, f"the image of inspection {inspection_id} is not kept")
        return FileResponse(path, headers={"Cache-Control": "private, max-age=86400"})

    @router.post("/{inspection_id}/label", summary="Label an inspection good or defect (replaces an earlier label)")
    async def label_inspection(inspection_id: str, body: LabelRequest, request: Request) -> dict[str, Any]:
        by = body.by or (request.client.host if request.client else "")
        return await call(store.set_label, inspection_id, body.label, body.note, by)

    return router
