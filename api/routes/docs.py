"""The interactive API reference at `/docs` (Swagger UI), served whole by this process.

FastAPI's own `/docs` loads Swagger UI from a CDN, so the page was blank offline or behind a
firewall; here its files come from `api/docs_assets/` (vendored, see its README). ReDoc, which
would need a CDN and web fonts too, is off: `/docs` and `/openapi.json` cover the same ground."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, FastAPI, HTTPException
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse

ASSETS_DIR = Path(__file__).resolve().parents[1] / "docs_assets"
ASSETS_PATH = "/docs/assets"
# What the page loads, and nothing else of the folder (its build script, lock file, ...).
ASSETS = {
    "swagger-ui-bundle.js": "text/javascript; charset=utf-8",
    "swagger-ui.css": "text/css; charset=utf-8",
    "favicon-32x32.png": "image/png",
}

router = APIRouter(include_in_schema=False)


@router.get("/docs")
def swagger_ui() -> HTMLResponse:
    return get_swagger_ui_html(
        openapi_url="/openapi.json",
        title="slimtrain API",
        swagger_js_url=f"{ASSETS_PATH}/swagger-ui-bundle.js",
        swagger_css_url=f"{ASSETS_PATH}/swagger-ui.css",
        swagger_favicon_url=f"{ASSETS_PATH}/favicon-32x32.png",
        # Swagger UI would otherwise send the document to an online validator for its badge.
        swagger_ui_parameters={"validatorUrl": None},
    )


@router.get(ASSETS_PATH + "/{name}")
def swagger_ui_asset(name: str) -> FileResponse:
    if name not in ASSETS:
        raise HTTPException(404, "Not Found")
    return FileResponse(ASSETS_DIR / name, media_type=ASSETS[name])


def install(app: FastAPI) -> None:
    """Serve `/docs` and its files; the app must be made with docs_url=None, redoc_url=None."""
    app.include_router(router)
