"""The web dashboard: a static page at `/` with its files under `/dashboard/`, plus the two reads
it needs that the jobs API lacks: the job spec's JSON Schema and the example specs.

The page is public, like any login page: it holds no data. Everything it shows comes from `/v1`
with the bearer token the user types in, which the page keeps in sessionStorage only."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, Field

from api.deps import CurrentTenant
from api.errors import documented
from service.spec import json_schema

DASHBOARD_DIR = Path(__file__).resolve().parents[1] / "dashboard"
# The examples a new user starts from live at the top of the source tree (DESIGN.md layout).
EXAMPLES_DIR = Path(__file__).resolve().parents[2] / "examples"

# The page runs only its own scripts and talks only to this origin: injected markup could
# neither run code nor send a token elsewhere, and the page cannot be framed (clickjacking).
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; script-src 'self'; style-src 'self'; "
    "img-src 'self' data: blob:; connect-src 'self'; object-src 'none'; base-uri 'none'; "
    "form-action 'self'; frame-ancestors 'none'",
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Cache-Control": "no-cache",
}

page = APIRouter(include_in_schema=False)
router = APIRouter(prefix="/v1", tags=["dashboard"])


@page.get("/")
def index() -> FileResponse:
    return FileResponse(DASHBOARD_DIR / "index.html", media_type="text/html", headers=PAGE_HEADERS)


class Example(BaseModel):
    name: str = Field(description="File name without `.yaml`, e.g. `digits-gmp90`.")
    title: str = Field(description="The example's first comment line: what it shows.")
    text: str = Field(description="The spec as written, YAML with its comments.")


class ExampleList(BaseModel):
    items: list[Example] = Field(description="The example specs, by name; empty when not installed.")


def read_examples(folder: Path = EXAMPLES_DIR) -> list[Example]:
    out = []
    # By name: sorting the file names would put `digits-gmp90-int8.yaml` before `digits-gmp90.yaml`.
    for path in sorted(folder.glob("*.yaml"), key=lambda p: p.stem):
        text = path.read_text(encoding="utf-8")
        first = text.splitlines()[0] if text else ""
        title = first.lstrip("#").strip() if first.startswith("#") else ""
        out.append(Example(name=path.stem, title=title, text=text))
    return out


@router.get(
    "/spec/examples",
    response_model=ExampleList,
    summary="Example job specs (the dashboard's starting points)",
    operation_id="spec_examples",
    responses=documented(401),
)
def spec_examples(_tenant: CurrentTenant) -> ExampleList:
    return ExampleList(items=read_examples())


@router.get(
    "/spec/schema",
    summary="The job spec's JSON Schema, with every field's default and description",
    operation_id="spec_schema",
    responses=documented(401),
)
def spec_schema(_tenant: CurrentTenant) -> dict:
    return json_schema()


def install(app: FastAPI) -> None:
    """Serve the page at `/`, its files under `/dashboard/` and the spec reads under `/v1`."""
    app.include_router(page)
    app.include_router(router)
    app.mount("/dashboard", StaticFiles(directory=DASHBOARD_DIR), name="dashboard")
