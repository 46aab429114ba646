"""API of the runs and compare pages: the queue, one run's live state (server-sent events), its files."""

from __future__ import annotations

import asyncio
import json
from dataclasses import asdict

from starlette.requests import Request
from starlette.responses import FileResponse, StreamingResponse
from starlette.routing import Route

from finetune.errors import UserError
from finetune.studio import outputs
from finetune.studio.http import endpoint, message_of, read_json, status_of, threaded
from finetune.studio.paths import confine, short
from finetune.studio.runs import RunManager

EVENT_EVERY_S = 1.0
HEARTBEAT_S = 15.0


def _runs(request: Request) -> RunManager:
    return request.app.state.studio.runs


def _public(run) -> dict:
    d = asdict(run)
    d.pop("pid", None)
    return d


def snapshot(manager: RunManager, run_id: str, after_step: int = -1) -> dict:
    """Everything the run page shows; loss rows only past `after_step` (the page keeps the earlier ones)."""
    run = manager.get(run_id)
    out = manager.output(run)
    tail = outputs.read_tail(manager.folder(run_id) / "log.txt")
    recipe = manager.recipe_data(run_id)
    v, t = recipe.get("validation") or {}, recipe.get("train") or {}
    return {
        "run": _public(run),
        "progress": outputs.progress(tail),
        "log": [short(manager.root, line) for line in outputs.log_lines(tail, 40)],
        "loss": outputs.loss_rows(out, after_step),
        "grids": outputs.grids(out),
        "scores": outputs.scores(out),
        "exports": outputs.exports(out),
        "checkpoints": outputs.checkpoints(out),
        "max_steps": _max_steps(run, t),
        "validation": {"prompts": v.get("prompts", []), "seeds": v.get("seeds", [0, 1])},
    }


def _max_steps(run, train: dict):
    """The run's step budget: a resume may have moved it (train.max_steps=N on the command line)."""
    for o in reversed(run.overrides):
        if o.startswith("train.max_steps="):
            return int(o.split("=", 1)[1])
    return train.get("max_steps")


@endpoint
async def list_runs(request: Request):
    return {"runs": [_public(r) for r in _runs(request).list()]}


@endpoint
async def create(request: Request):
    body = await read_json(request)
    data = body.get("data")
    if not isinstance(data, dict):
        raise UserError("data: the recipe must be a mapping of sections")
    run = await threaded(_runs(request).create, data, body.get("name"), body.get("accelerate_config"),
                         body.get("parent"))
    return _public(run)


@endpoint
async def get_run(request: Request):
    return await threaded(snapshot, _runs(request), request.path_params["run_id"])


@endpoint
async def stop(request: Request):
    return _public(await threaded(_runs(request).stop, request.path_params["run_id"]))


@endpoint
async def resume(request: Request):
    body = await read_json(request)
    run = await threaded(_runs(request).resume, request.path_params["run_id"], body.get("max_steps"))
    return _public(run)


@endpoint
async def recipe(request: Request):
    return await threaded(_runs(request).recipe_data, request.path_params["run_id"])


@endpoint
async def file(request: Request):
    manager = _runs(request)
    run = manager.get(request.path_params["run_id"])
    path = confine(manager.output(run), request.path_params["path"], "file")
    if not path.is_file():
        raise FileNotFoundError(request.path_params["path"])
    download = request.query_params.get("download") == "1"
    return FileResponse(path, filename=path.name if download else None,
                        content_disposition_type="attachment" if download else "inline",
                        headers={"cache-control": "no-store"})


async def events(request: Request):
    """Server-sent events: one `snapshot` message whenever something changed, new loss rows only."""
    manager, run_id = _runs(request), request.path_params["run_id"]
    try:
        manager.get(run_id)
    except KeyError:
        return await endpoint(_missing)(request)

    async def stream():
        cursor, last, quiet = -1, None, 0.0
        while not await request.is_disconnected():
            try:
                snap = await threaded(snapshot, manager, run_id, cursor)
            except Exception as e:  # noqa: BLE001 - tell the page, keep the stream
                snap = {"error": message_of(e, manager.root), "status": status_of(e)}
            rows = snap.get("loss") or []
            if rows:
                cursor = rows[-1][0]
            key = json.dumps({k: v for k, v in snap.items() if k != "loss"}, sort_keys=True)
            if rows or key != last:
                last, quiet = key, 0.0
                yield f"event: snapshot\ndata: {json.dumps(snap)}\n\n"
            elif quiet >= HEARTBEAT_S:
                quiet = 0.0
                yield ": ping\n\n"
            await asyncio.sleep(EVENT_EVERY_S)
            quiet += EVENT_EVERY_S

    return StreamingResponse(stream(), media_type="text/event-stream",
                             headers={"cache-control": "no-store", "x-accel-buffering": "no"})


async def _missing(request: Request):
    raise KeyError(request.path_params["run_id"])


def routes() -> list[Route]:
    return [
        Route("/api/runs", list_runs),
        Route("/api/runs", create, methods=["POST"]),
        Route("/api/runs/{run_id}", get_run),
        Route("/api/runs/{run_id}/events", events),
        Route("/api/runs/{run_id}/stop", stop, methods=["POST"]),
        Route("/api/runs/{run_id}/resume", resume, methods=["POST"]),
        Route("/api/runs/{run_id}/recipe", recipe),
        Route("/api/runs/{run_id}/files/{path:path}", file),
    ]
