"""The web page at `/`: a chat over the same OpenAI-compatible API, and a live view of the cluster.

Plain static files shipped inside the package (coordinator/web/: no framework, no CDN, no build
step), so `pip install edgeweave` is all a browser needs. They are served outside `/v1/`, hence open
even when the server has an API key; the page itself sends the key (a field it keeps in
localStorage) as a Bearer token on its `/v1/` calls.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles
from starlette.responses import Response

#: the page's files (index.html, app.js, style.css), next to this module in the installed package
WEB_DIR = Path(__file__).resolve().parent / "web"
#: where the assets are served; index.html refers to them by this prefix
ASSETS_PATH = "/ui"
#: revalidate each load, so a browser never runs an old app.js against a newer server
NO_STALE = {"Cache-Control": "no-cache"}


class _Assets(StaticFiles):
    """StaticFiles that asks browsers to revalidate (a cheap 304 via the ETag it already sends)."""

    def file_response(self, *args, **kwargs) -> Response:
        response = super().file_response(*args, **kwargs)
        response.headers.update(NO_STALE)
        return response


def mount_web_ui(app: FastAPI) -> None:
    """Serve the page at `GET /` and its assets under `/ui/`."""
    index = WEB_DIR / "index.html"

    @app.get("/", include_in_schema=False)
    async def web_page() -> FileResponse:
        return FileResponse(index, media_type="text/html", headers=NO_STALE)

    app.mount(ASSETS_PATH, _Assets(directory=WEB_DIR), name="web-ui")
