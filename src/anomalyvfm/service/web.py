"""The inspection web page: `GET /` serves a static page that talks to the JSON API from the browser.

Quality engineers judge a model by looking at it, not by reading JSON. The page is plain HTML, CSS and
JavaScript shipped inside the package (`service/static/`), so it works on a plant network with no
internet: no CDN, no build step, no framework. It holds no server-side state: every picture and score it
shows comes from `POST /predict?maps=true` and `GET /model`, and uploads go through the same in-memory
path as any other API client, so nothing uploaded is written to the server's disk.

The page itself needs no API key (it contains no model data); it asks for the key when the API first
answers 401 and sends it as `X-API-Key` from then on.
"""
from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

STATIC_DIR = Path(__file__).resolve().parent / "static"
STATIC_URL = "/static"

# Only this origin's scripts, styles and API; pictures also from data: (the API's base64 PNGs) and blob:
# (the user's own files, shown without a round trip). No inline script, so an injected file name cannot run.
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data: blob:; script-src 'self'; "
                               "style-src 'self'; connect-src 'self'; object-src 'none'; base-uri 'none'; "
                               "frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",  # revalidate, so an upgraded package's page is picked up at once
}


def mount_web(app: FastAPI) -> None:
    """Serve the inspection page at `/` and its assets under `/static` on `app` (outside any API-key guard)."""
    if not (STATIC_DIR / "index.html").is_file():
        raise RuntimeError(f"{STATIC_DIR}: the web page's files are missing from the installed package")

    @app.get("/", include_in_schema=False)
    async def inspection_page() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html", headers=SECURITY_HEADERS)

    app.mount(STATIC_URL, StaticFiles(directory=STATIC_DIR), name="static")
