"""The studio application: one Starlette app over the package, its static page and its JSON API.

    app = create_app(Studio.make(root=Path("."), host="127.0.0.1"))

Starlette (routing, streaming responses for server-sent events) and uvicorn (the server) are the whole
stack; the page is plain HTML, CSS and JavaScript files served as they are, with no build step.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass, field
from pathlib import Path

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

import finetune
from finetune.studio import api_data, api_runs, recipes
from finetune.studio.jobs import Jobs
from finetune.studio.runs import RunManager
from finetune.studio.security import Guard, is_loopback, new_token

STATIC = Path(__file__).resolve().parent / "static"
REPO = Path(finetune.__file__).resolve().parent.parent
MAX_UPLOAD_MB = 50


@dataclass
class Studio:
    root: Path  # resolved; every browser path lives under it
    host: str = "127.0.0.1"
    token: str | None = None  # required on a non-loopback bind
    recipes_dir: Path = REPO / "recipes"
    tools_dir: Path = REPO / "tools"
    max_upload: int = MAX_UPLOAD_MB * 1024 * 1024
    devices: list[str | None] = field(default_factory=lambda: [None])
    hold: bool = False  # queue runs without starting them
    runs: RunManager = None  # type: ignore[assignment]
    jobs: Jobs = None  # type: ignore[assignment]

    @classmethod
    def make(cls, root: Path, host: str = "127.0.0.1", token: str | None = None, **kw) -> Studio:
        """A studio over `root`; a non-loopback host gets a token (the given one, or a new one)."""
        real = Path(os.path.realpath(root))
        if not real.is_dir():
            raise NotADirectoryError(f"--root {root}: not a folder")
        if not is_loopback(host) and not token:
            token = new_token()
        s = cls(root=real, host=host, token=token if not is_loopback(host) else None, **kw)
        s.runs = RunManager(real, s.recipes_dir, s.devices, s.hold)
        s.jobs = Jobs(real / ".studio" / "jobs", real)
        return s

    @property
    def caption_tool(self) -> Path | None:
        tool = self.tools_dir / "caption.py"
        return tool if tool.is_file() else None

    @property
    def has_estimate(self) -> bool:
        return importlib.util.find_spec("finetune.memory.estimate") is not None  # what `finetune estimate` runs


async def index(request: Request):
    return FileResponse(STATIC / "index.html", headers={"cache-control": "no-store"})


async def info(request: Request):
    s: Studio = request.app.state.studio
    return JSONResponse({
        "root": s.root.name or str(s.root),
        "recipes": recipes.shipped_recipes(s.recipes_dir),
        "accelerate_configs": recipes.accelerate_configs(s.recipes_dir),
        "devices": [d or "all" for d in s.devices],
        "max_upload": s.max_upload,
        "features": {"caption": s.caption_tool is not None, "estimate": s.has_estimate},
    })


def create_app(studio: Studio) -> Guard:
    routes = [Route("/", index), Route("/api/info", info), *api_data.routes(), *api_runs.routes(),
              Mount("/static", StaticFiles(directory=STATIC), name="static")]
    app = Starlette(routes=routes)
    app.state.studio = studio
    guarded = Guard(app, studio.token)
    guarded.state = app.state  # tests and the CLI reach the studio through the outer app too
    return guarded
