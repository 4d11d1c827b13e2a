"""`/docs` from local files, so the API page works on a plant network without internet access.

FastAPI's default page loads Swagger UI's script and style from a CDN and is blank offline. The
`swagger-ui-bundle-v2` package (Apache-2.0, part of the `serve` extra) ships Swagger UI 5 — needed for the
OpenAPI 3.1 documents FastAPI writes — and its files are served here under `/docs/assets`. Without the
package the CDN page is kept, and that is said once in the log.
"""
from __future__ import annotations

import logging

from fastapi import FastAPI
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse
from starlette.staticfiles import StaticFiles

ASSETS = "/docs/assets"


def swagger_ui_files() -> str | None:
    """Folder of the installed Swagger UI files, or None."""
    try:
        from swagger_ui_bundle import swagger_ui_path
    except ImportError:
        return None
    path = swagger_ui_path
    return str(path) if (path / "swagger-ui-bundle.js").is_file() else None


def mount_docs(app: FastAPI) -> None:
    """Serve `/docs` from local assets (`app` must be created with `docs_url=None`)."""
    folder = swagger_ui_files()
    if folder is None:
        logging.getLogger("anomalyvfm.error").warning(
            "swagger-ui-bundle-v2 is not installed: /docs loads Swagger UI from a CDN (pip install 'anomalyvfm[serve]')")
        urls = {}
    else:
        app.mount(ASSETS, StaticFiles(directory=folder), name="docs-assets")
        urls = {"swagger_js_url": f"{ASSETS}/swagger-ui-bundle.js", "swagger_css_url": f"{ASSETS}/swagger-ui.css",
                "swagger_favicon_url": f"{ASSETS}/favicon-32x32.png"}

    @app.get("/docs", include_in_schema=False)
    async def docs() -> HTMLResponse:
        return get_swagger_ui_html(openapi_url=app.openapi_url, title=f"{app.title} — API", **urls)
