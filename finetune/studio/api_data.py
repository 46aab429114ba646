"""API of the data and recipe pages."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from finetune.errors import UserError
from finetune.studio import dataset, procs, recipes
from finetune.studio.http import TooLarge, endpoint, number, read_body, read_json, threaded
from finetune.studio.paths import PathError, confine, refuse_links_out, relative_parts, short
from finetune.studio.schema import form_spec

MAX_PREFIX_CHARS = 1000


def _studio(request: Request):
    return request.app.state.studio


def _q(request: Request, name: str, default: str | None = None) -> str:
    value = request.query_params.get(name, default)
    if value is None:
        raise UserError(f"query parameter '{name}' is required")
    return value


# ---------------------------------------------------------------------------------------------- data
@endpoint
async def folders(request: Request):
    return await threaded(dataset.list_folders, _studio(request).root, _q(request, "path", ""))


@endpoint
async def images(request: Request):
    s = _studio(request)
    return await threaded(dataset.folder_images, s.root, _q(request, "path"), _q(request, "caption_ext", ".txt"))


@endpoint
async def image(request: Request):
    size = number(_q(request, "size", "256"), "size", 0, 2048)
    data = await threaded(dataset.thumbnail, _studio(request).root, _q(request, "path"), size)
    media = "image/png" if size > 0 else "application/octet-stream"
    return Response(data, media_type=media, headers={"cache-control": "no-store"})


@endpoint
async def caption(request: Request):
    body = await read_json(request)
    return await threaded(dataset.save_caption, _studio(request).root, body.get("path"), body.get("caption"),
                          body.get("caption_ext", ".txt"))


@endpoint
async def scan(request: Request):
    b = await read_json(request)
    resolution = number(b.get("resolution", 512), "resolution", 64, 4096)
    return await threaded(dataset.scan_folder, _studio(request).root, b.get("path", ""), resolution,
                          bool(b.get("buckets", True)), b.get("caption_ext", ".txt"), bool(b.get("recursive", False)))


@endpoint
async def upload(request: Request):
    """PUT raw bytes as a new image (or a caption beside one) in a folder under the root; size-capped, the
    content checked (dataset.upload), never over an existing file."""
    s = _studio(request)
    folder = confine(s.root, _q(request, "folder"), "folder")
    name = _q(request, "name")
    if len(relative_parts(name, "name")) != 1 or name.strip() != name or name.startswith(".") \
            or any(ord(c) < 32 for c in name):
        raise PathError(f"name: {name[:80]!r} must be a plain file name")
    if not folder.is_dir():
        raise UserError("folder: not a folder under the studio root")
    if os.path.lexists(folder / name):  # checked again, atomically, when the file is linked into place
        raise UserError(f"name: '{name}' already exists in that folder; nothing was overwritten")
    data = await read_body(request, s.max_upload)
    return await threaded(dataset.upload, s.root, folder, name, data)


@endpoint
async def caption_all(request: Request):
    """The auto-caption button: runs the captioning tool (tools/caption.py) on a folder, as a job. The folder
    obeys the dataset rule (no links out of the root); the prefix reaches the tool as one `--prefix=` word and
    the folder after `--`, so no text the page sends can become an option."""
    s = _studio(request)
    tool = s.caption_tool
    if tool is None:
        raise UserError("auto-captioning is not available: this checkout has no tools/caption.py")
    body = await read_json(request)
    folder = confine(s.root, body.get("path", ""), "folder")
    if not folder.is_dir():
        raise UserError("path: not a folder under the studio root")
    refuse_links_out(s.root, folder, "folder", "the captioning tool")
    prefix = body.get("prefix") or ""
    if not isinstance(prefix, str) or len(prefix) > MAX_PREFIX_CHARS or "\x00" in prefix or prefix == "--":
        # argparse reads '--prefix=--' as no value at all: '--' alone is refused rather than mangled
        raise UserError(f"prefix: text of at most {MAX_PREFIX_CHARS} characters (and not '--' alone)")
    # tools/ finds its own helpers next to it (sys.path[0]), so no -P here; the working folder is the studio's
    cmd = [sys.executable, str(tool), *([f"--prefix={prefix}"] if prefix else []), "--", str(folder)]
    return s.jobs.start("caption", cmd, procs.work_dir(s.root / ".studio" / "jobs"))


@endpoint
async def job(request: Request):
    return _studio(request).jobs.status(request.path_params["job_id"])


# -------------------------------------------------------------------------------------------- recipes
@endpoint
async def form(request: Request):
    return {"fields": form_spec()}


@endpoint
async def shipped(request: Request):
    return await threaded(recipes.load_shipped, _studio(request).recipes_dir, request.path_params["name"])


def _check_recipe(s, data: dict) -> dict:
    checked = recipes.check_recipe(data, s.root)
    return {"errors": checked.errors, "yaml": checked.yaml}


@endpoint
async def validate(request: Request):
    body = await read_json(request)
    return await threaded(_check_recipe, _studio(request), body.get("data"))


def _data_check(s, data: dict) -> dict:
    from finetune.data.check import check_data
    from finetune.recipe import validate as validate_recipe

    checked = recipes.check_recipe(data, s.root)
    result = {"errors": checked.errors, "yaml": checked.yaml}
    if checked.errors:
        return result | {"summary": ""}
    try:
        summary = check_data(validate_recipe(checked.launch, Path(recipes.SOURCE_NAME)))
    except UserError as e:
        return result | {"summary": "", "errors": [{"key": "", "message": short(s.root, str(e))}]}
    return result | {"summary": short(s.root, summary)}


@endpoint
async def check(request: Request):
    body = await read_json(request)
    return await threaded(_data_check, _studio(request), body.get("data"))


def _estimate(s, data: dict) -> dict:
    checked = recipes.check_recipe(data, s.root)
    result = {"errors": checked.errors, "yaml": checked.yaml}
    if checked.errors:
        return result | {"estimate": ""}
    tmp = s.root / ".studio" / "tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    fd, path = tempfile.mkstemp(suffix=".yaml", dir=tmp)
    with os.fdopen(fd, "w") as f:
        f.write(recipes.to_yaml(checked.launch))
    try:  # as a run starts: safe-path mode, in a working folder of the studio's (see procs)
        out = subprocess.run([*procs.python(), "-m", "finetune", "estimate", path], cwd=procs.work_dir(tmp),
                             env=procs.safe_env(), capture_output=True, text=True, timeout=300)
    finally:
        os.unlink(path)
    return result | {"estimate": short(s.root, (out.stdout + out.stderr).strip())}


@endpoint
async def estimate(request: Request):
    s = _studio(request)
    if not s.has_estimate:
        raise UserError("`finetune estimate` is not available in this version")
    body = await read_json(request)
    return await threaded(_estimate, s, body.get("data"))


def routes() -> list[Route]:
    return [
        Route("/api/data/folders", folders),
        Route("/api/data/images", images),
        Route("/api/data/image", image),
        Route("/api/data/caption", caption, methods=["PUT"]),
        Route("/api/data/scan", scan, methods=["POST"]),
        Route("/api/data/upload", upload, methods=["PUT"]),
        Route("/api/data/caption-all", caption_all, methods=["POST"]),
        Route("/api/jobs/{job_id}", job),
        Route("/api/form", form),
        Route("/api/recipes/{name:path}", shipped),
        Route("/api/recipe/validate", validate, methods=["POST"]),
        Route("/api/recipe/check", check, methods=["POST"]),
        Route("/api/recipe/estimate", estimate, methods=["POST"]),
    ]


__all__ = ["routes", "TooLarge"]
