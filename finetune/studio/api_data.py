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

from finetune.data.images import IMAGE_EXTS, BadImage, probe
from finetune.errors import UserError
from finetune.studio import dataset, recipes
from finetune.studio.http import TooLarge, endpoint, read_body, read_json, threaded
from finetune.studio.paths import PathError, confine, relative
from finetune.studio.schema import form_spec


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
    size = int(_q(request, "size", "256"))
    data = await threaded(dataset.thumbnail, _studio(request).root, _q(request, "path"), max(0, min(size, 2048)))
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
    return await threaded(dataset.scan_folder, _studio(request).root, b.get("path", ""), int(b.get("resolution", 512)),
                          bool(b.get("buckets", True)), b.get("caption_ext", ".txt"), bool(b.get("recursive", False)))


@endpoint
async def upload(request: Request):
    """PUT raw bytes as a new image (or .txt) in a folder under the root; size-capped, never overwrites."""
    s = _studio(request)
    folder = confine(s.root, _q(request, "folder"), "folder")
    name = _q(request, "name")
    if not name or name.startswith(".") or "/" in name or "\\" in name or "\x00" in name:
        raise PathError(f"name: '{name}' must be a plain file name")
    ext = Path(name).suffix.lower()
    if ext not in IMAGE_EXTS and ext != ".txt":
        raise UserError(f"name: '{name}': only images ({', '.join(sorted(IMAGE_EXTS))}) and .txt captions")
    if not folder.is_dir():
        raise UserError(f"folder: '{_q(request, 'folder')}' is not a folder under the studio root")
    target = folder / name  # a plain name in a confined folder; an existing entry (a link too) is refused
    if os.path.lexists(target):
        raise UserError(f"name: '{name}' already exists in that folder; nothing was overwritten")
    data = await read_body(request, s.max_upload)
    if ext in IMAGE_EXTS:
        try:
            probe(data)
        except BadImage as e:
            raise UserError(f"{name}: {e}") from None
    return await threaded(_write_new, folder, target, data, s.root)


def _write_new(folder: Path, target: Path, data: bytes, root: Path) -> dict:
    fd, tmp = tempfile.mkstemp(prefix=".upload-", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.link(tmp, target)  # fails if the name appeared meanwhile: no clobbering, ever
    except FileExistsError:
        raise UserError(f"{target.name} already exists; nothing was overwritten") from None
    finally:
        os.unlink(tmp)
    return {"path": relative(root, target), "bytes": len(data)}


@endpoint
async def caption_all(request: Request):
    """The auto-caption button: runs the captioning tool (tools/caption.py) on a folder, as a job."""
    s = _studio(request)
    tool = s.caption_tool
    if tool is None:
        raise UserError("auto-captioning is not available: this checkout has no tools/caption.py")
    body = await read_json(request)
    folder = confine(s.root, body.get("path", ""), "folder")
    cmd = [sys.executable, str(tool), str(folder)]
    if body.get("prefix"):
        cmd += ["--prefix", str(body["prefix"])]
    return s.jobs.start("caption", cmd, s.root)


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
    if not isinstance(data, dict):
        raise UserError("data: the recipe must be a mapping of sections")
    _, path_errors = recipes.confine_recipe(data, s.root)
    errors = recipes.validation_errors(data) + path_errors
    return {"errors": errors, "yaml": recipes.to_yaml(data)}


@endpoint
async def validate(request: Request):
    body = await read_json(request)
    return await threaded(_check_recipe, _studio(request), body.get("data"))


def _data_check(s, data: dict) -> dict:
    from finetune.data.check import check_data
    from finetune.recipe import validate as validate_recipe

    result = _check_recipe(s, data)
    if result["errors"]:
        return result | {"summary": ""}
    absolute, _ = recipes.confine_recipe(data, s.root)
    try:
        summary = check_data(validate_recipe(absolute, Path(recipes.SOURCE_NAME)))
    except UserError as e:
        return result | {"summary": "", "errors": [{"key": "", "message": dataset._short(s.root, str(e))}]}
    return result | {"summary": dataset._short(s.root, summary)}


@endpoint
async def check(request: Request):
    body = await read_json(request)
    return await threaded(_data_check, _studio(request), body.get("data"))


def _estimate(s, data: dict) -> dict:
    result = _check_recipe(s, data)
    if result["errors"]:
        return result | {"estimate": ""}
    tmp = s.root / ".studio" / "tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    fd, path = tempfile.mkstemp(suffix=".yaml", dir=tmp)
    with os.fdopen(fd, "w") as f:
        f.write(result["yaml"])
    try:
        out = subprocess.run([sys.executable, "-m", "finetune", "estimate", path], cwd=s.root,
                             capture_output=True, text=True, timeout=300)
    finally:
        os.unlink(path)
    return result | {"estimate": (out.stdout + out.stderr).strip()}


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
