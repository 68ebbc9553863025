"""GET / (to the explorer), /explorer and its assets, and /docs and /redoc with locally served assets."""

from __future__ import annotations

from functools import cache
from pathlib import Path

import fastapi_offline
from fastapi import APIRouter, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from starlette.exceptions import HTTPException
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.routing import BaseRoute, Mount
from starlette.staticfiles import StaticFiles

from app.auth import PUBLIC_TAG

STATIC_DIR = Path(__file__).parent / "static"
EXPLORER_ASSETS = "/explorer/assets"
DOCS_ASSETS = "/docs/assets"
# Swagger UI's and ReDoc's builds, as fastapi-offline ships them.
DOCS_ASSETS_DIR = Path(fastapi_offline.__file__).parent / "static"
# The explorer's page may load only what the service serves: no CDN, no fonts, no analytics.
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; img-src 'self' blob: data:; style-src 'self'; script-src 'self'; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)

# ReDoc's sidebar shows a logo fetched from Redocly's CDN; the local copy shows the favicon instead.
REDOC_REMOTE_LOGO = b"https://cdn.redoc.ly/redoc/logo-mini.svg"

router = APIRouter(include_in_schema=False)


@cache
def redoc_script() -> bytes:
    """redoc.standalone.js with its one remote image pointed at a local one."""
    script = (DOCS_ASSETS_DIR / "redoc.standalone.js").read_bytes()
    return script.replace(REDOC_REMOTE_LOGO, f"{DOCS_ASSETS}/favicon.png".encode())


@cache
def explorer_page() -> bytes:
    return (STATIC_DIR / "index.html").read_bytes()


@cache
def explorer_files() -> dict[str, tuple[bytes, str]]:
    """The explorer's scripts and styles by file name, with their media types."""
    media_types = {".js": "text/javascript", ".css": "text/css"}
    return {
        path.name: (path.read_bytes(), media_types[path.suffix])
        for path in STATIC_DIR.iterdir()
        if path.suffix in media_types
    }


@router.get("/", tags=[PUBLIC_TAG])
async def home() -> Response:
    return RedirectResponse("/explorer", status_code=307)


@router.get("/explorer", tags=[PUBLIC_TAG])
async def explorer() -> Response:
    return HTMLResponse(explorer_page(), headers={"Content-Security-Policy": CONTENT_SECURITY_POLICY})


@router.get(EXPLORER_ASSETS + "/{name}", tags=[PUBLIC_TAG])
async def explorer_asset(name: str) -> Response:
    found = explorer_files().get(name)
    if found is None:
        raise HTTPException(404)
    content, media_type = found
    return Response(content, media_type=media_type)


@router.get("/docs")
async def swagger_ui(request: Request) -> HTMLResponse:
    return get_swagger_ui_html(
        openapi_url=str(request.app.openapi_url),
        title=f"{request.app.title} - Swagger UI",
        swagger_js_url=f"{DOCS_ASSETS}/swagger-ui-bundle.js",
        swagger_css_url=f"{DOCS_ASSETS}/swagger-ui.css",
        swagger_favicon_url=f"{DOCS_ASSETS}/favicon.png",
        # Swagger UI would otherwise send the schema to validator.swagger.io for its badge.
        swagger_ui_parameters={"validatorUrl": None},
    )


@router.get(f"{DOCS_ASSETS}/redoc.standalone.js")
async def redoc_asset() -> Response:
    return Response(redoc_script(), media_type="text/javascript")


@router.get("/redoc")
async def redoc(request: Request) -> HTMLResponse:
    return get_redoc_html(
        openapi_url=str(request.app.openapi_url),
        title=f"{request.app.title} - ReDoc",
        redoc_js_url=f"{DOCS_ASSETS}/redoc.standalone.js",
        redoc_favicon_url=f"{DOCS_ASSETS}/favicon.png",
        with_google_fonts=False,
    )


def asset_mounts() -> list[BaseRoute]:
    """The documentation's files, as a static mount (behind the key with the docs, when ops endpoints are)."""
    return [Mount(DOCS_ASSETS, StaticFiles(directory=DOCS_ASSETS_DIR), name="docs-assets")]
