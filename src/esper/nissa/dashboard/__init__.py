"""`esper dashboard`: every run of a folder in the browser: the run list, a run's page, a comparison page.

A Starlette application served by uvicorn. Pages are plain HTML with charts rendered on the server as
inline SVG (`esper.nissa.dashboard.svg`): no JavaScript, no front-end build, nothing fetched from a CDN,
so the dashboard works on a machine with no internet and keeps working without front-end upkeep. Each
request reads the run files again, and a running run's page reloads itself, so the view follows the run.
"""

from __future__ import annotations

from pathlib import Path

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse
from starlette.routing import Route

from esper.leyline import EsperError
from esper.nissa.dashboard.pages import compare_page, error_page, run_list_page, run_page

__all__ = ["create_app"]


def create_app(runs_root: Path, *, refresh_s: int = 5) -> Starlette:
    """The dashboard of the runs under `runs_root`."""

    async def index(_: Request) -> HTMLResponse:
        return HTMLResponse(run_list_page(runs_root))

    async def run(request: Request) -> HTMLResponse:
        name = str(request.path_params["name"])
        try:
            return HTMLResponse(run_page(runs_root, name, refresh_s=refresh_s))
        except EsperError as exc:
            return HTMLResponse(error_page(str(exc)), status_code=404)

    async def compare(request: Request) -> HTMLResponse:
        names = request.query_params.getlist("run")
        try:
            return HTMLResponse(compare_page(runs_root, names))
        except EsperError as exc:
            return HTMLResponse(error_page(str(exc)), status_code=404)

    return Starlette(
        routes=[
            Route("/", index),
            Route("/runs/{name}", run),
            Route("/compare", compare),
        ]
    )
