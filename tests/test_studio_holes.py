"""The five holes an outside attack on the studio found (issue #32), each reproduced as a request.

Every test here failed against the studio before the fix (the note of branch studio32 lists how), and shows
that the request is now refused with one line and that nothing it aimed at changed.
"""

from __future__ import annotations

import io
import os

import pytest

from tests.studio_helpers import CAPTIONER, W, client, png, snapshot, wait_until, world  # noqa: F401  (fixture)


def _png_bytes(colour=(9, 9, 9)) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (64, 64), colour).save(buf, format="PNG")
    return buf.getvalue()


def _upload(c, folder: str, name: str, body: bytes):
    return c.put("/api/data/upload", params={"folder": folder, "name": name}, content=body, headers=W)


def _toy(c, output_dir: str = "runs/a") -> dict:
    data = c.get("/api/recipes/toy/lora.yaml").json()
    data["train"]["output_dir"] = output_dir
    return data


def _one_line_4xx(r, root) -> None:
    assert 400 <= r.status_code < 500, (r.status_code, r.text[:300])
    body = r.json()
    assert "\n" not in body["error"] and len(body["error"]) < 400, body["error"][:500]
    assert str(root) not in r.text, r.text[:300]


# ------------------------------------------------------------------------ 1. code execution through a caption
def test_a_caption_write_cannot_replace_an_image_or_write_code(world):  # noqa: F811
    root, _ = world
    c, _ = client(root)
    image = (root / "data" / "0.png").read_bytes()
    r = c.put("/api/data/caption", json={"path": "data/0.png", "caption": "text", "caption_ext": ".png"}, headers=W)
    _one_line_4xx(r, root)
    assert (root / "data" / "0.png").read_bytes() == image
    assert _upload(c, "", "yaml.png", _png_bytes()).status_code == 200
    r = c.put("/api/data/caption", headers=W,
              json={"path": "yaml.png", "caption": "open('pwned', 'w')", "caption_ext": ".py"})
    _one_line_4xx(r, root)
    assert not (root / "yaml.py").exists()
    for ext in (".txt", ".caption"):  # the allow-list still writes
        r = c.put("/api/data/caption", json={"path": "yaml.png", "caption": "a cat", "caption_ext": ext}, headers=W)
        assert r.status_code == 200 and (root / f"yaml{ext}").read_text() == "a cat\n"
    (root / "data" / "1.caption").mkdir()  # never over something that is not a caption file
    r = c.put("/api/data/caption", json={"path": "data/1.png", "caption": "x", "caption_ext": ".caption"}, headers=W)
    _one_line_4xx(r, root)
    assert (root / "data" / "1.caption").is_dir()


def test_no_request_reaches_the_recipe_a_run_launches(world):  # noqa: F811
    root, _ = world
    c, studio = client(root)
    run_id = c.post("/api/runs", json={"data": _toy(c)}, headers=W).json()["id"]
    folder = f".studio/runs/{run_id}"
    launched = (root / folder / "recipe.yaml").read_bytes()
    _one_line_4xx(_upload(c, folder, "recipe.png", _png_bytes()), root)
    png(root / folder / "recipe.png")  # even with an image there (put by hand), the caption write is refused
    r = c.put("/api/data/caption", json={"path": f"{folder}/recipe.png", "caption": "model: {base: x}",
                                         "caption_ext": ".yaml"}, headers=W)
    _one_line_4xx(r, root)
    for url, params in (("/api/data/images", {"path": folder}), ("/api/data/folders", {"path": ".studio"}),
                        ("/api/data/image", {"path": f"{folder}/recipe.png", "size": "0"})):
        _one_line_4xx(c.get(url, params=params), root)
    assert (root / folder / "recipe.yaml").read_bytes() == launched


# ------------------------------------------------------------------------------- 2. accelerate_config escapes
def test_accelerate_config_is_a_name_from_the_shipped_list_never_a_path(world):  # noqa: F811
    root, outside = world
    c, studio = client(root)
    accel = studio.recipes_dir / "accelerate"
    exists = os.path.relpath(outside / "secret.txt", accel)
    missing = os.path.relpath(outside / "no-such-file", accel)
    answers = []
    for name in (exists, missing, "/etc/hostname", "cpu_2proc", "../accelerate/cpu_2proc.yaml"):
        r = c.post("/api/runs", json={"data": _toy(c), "accelerate_config": name}, headers=W)
        _one_line_4xx(r, root)
        answers.append((r.status_code, r.json()["error"].replace(name, "NAME")))
    assert answers[0] == answers[1]  # the answer says nothing about which files exist
    assert studio.runs.list() == []
    r = c.post("/api/runs", json={"data": _toy(c), "accelerate_config": "cpu_2proc.yaml"}, headers=W)
    assert r.status_code == 200 and r.json()["accelerate_config"] == "cpu_2proc.yaml"


# ------------------------------------------------------------------------ 3. recipe path fields not confined
@pytest.mark.parametrize("key", ["data.masks.folder", "validation.reference_dir", "validation.clip_model",
                                 "validation.dino_model"])
def test_the_recipe_paths_the_attack_read_through_are_confined(world, key):  # noqa: F811
    root, outside = world
    c, studio = client(root)
    section, name = key.split(".", 1)
    png(root / "sets" / "0.png")
    (root / "sets" / "m").symlink_to(outside, target_is_directory=True)
    # masks.folder is relative to each image's own folder (sets/ here): 'm' is the link out there
    bads = [str(outside), "../../outside", "m"] if key == "data.masks.folder" else \
        [str(outside), "../outside", "escape", "data/../../outside"]
    for bad in bads:
        data = _toy(c)
        if key == "data.masks.folder":
            data["data"]["sources"] = [{"type": "folder", "path": "sets"}]
            data["data"]["masks"] = {"folder": bad}
        else:
            data[section][name] = bad
        errors = c.post("/api/recipe/validate", json={"data": data}, headers=W).json()["errors"]
        assert key in {e["key"] for e in errors}, (bad, errors)
        r = c.post("/api/runs", json={"data": data}, headers=W)
        assert r.status_code == 422 and key in {e["key"] for e in r.json()["errors"]}, (bad, r.text)
    assert studio.runs.list() == []


# -------------------------------------------------------------------------------------- 4. caption-all
def _caption_all(c, body: dict) -> dict:
    r = c.post("/api/data/caption-all", json=body, headers=W)
    assert r.status_code == 200, r.text
    job_id = r.json()["id"]
    wait_until(lambda: not c.get(f"/api/jobs/{job_id}").json()["running"])
    return c.get(f"/api/jobs/{job_id}").json()


@pytest.fixture()
def captioner(world, tmp_path):  # noqa: F811
    tools = tmp_path / "tools"
    tools.mkdir()
    (tools / "caption.py").write_text(CAPTIONER)  # tools/caption.py's command line, no model
    return world[0], world[1], client(world[0], tools_dir=tools)[0]


def test_caption_all_refuses_a_folder_with_links_out_of_the_root(captioner):
    root, outside, c = captioner
    before = snapshot(outside)
    r = c.post("/api/data/caption-all", json={"path": "data"}, headers=W)  # the tool would read data/link.png
    _one_line_4xx(r, root)
    assert "data/link.png" in r.json()["error"]
    assert snapshot(outside) == before and (root / "data" / "link.txt").is_symlink()


def test_caption_all_passes_user_text_as_text_not_as_options(captioner):
    root, _, c = captioner
    png(root / "sets" / "0.png")
    for prefix in ("-x", "-x, ", "-- ", "--help", "--prefix=y "):
        (root / "sets" / "0.txt").unlink(missing_ok=True)
        job = _caption_all(c, {"path": "sets", "prefix": prefix})
        assert job["exit_code"] == 0, job
        assert (root / "sets" / "0.txt").read_text() == prefix + "a captioned image"
    for bad in (["x"], "--"):  # argparse would read '--prefix=--' as no value: refused, not mangled
        _one_line_4xx(c.post("/api/data/caption-all", json={"path": "sets", "prefix": bad}, headers=W), root)


# ---------------------------------------------------------------- 5. YAML limits, 500s, absolute paths, modes
def test_a_run_recipe_that_expands_past_the_yaml_limits_is_refused(world):  # noqa: F811
    root, _ = world
    c, _ = client(root)
    run_id = c.post("/api/runs", json={"data": _toy(c)}, headers=W).json()["id"]
    bomb = "a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{n}: &{n} [{', '.join(['*' + p] * 10)}]\n" for p, n in zip("abcde", "bcdef", strict=True))
    assert len(bomb) < 400
    (root / ".studio" / "runs" / run_id / "recipe.yaml").write_text(bomb)  # 10^6 values once expanded
    r = c.get(f"/api/runs/{run_id}/recipe")
    _one_line_4xx(r, root)
    assert len(r.content) < 1000


def test_malformed_requests_are_one_line_4xx_without_absolute_paths(world):  # noqa: F811
    root, _ = world
    c, studio = client(root)
    deep = b'{"data": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    answers = [
        c.get("/api/data/images", params={"path": "a" * 10_000}),
        c.get("/api/data/folders", params={"path": "x/" * 3000}),
        _upload(c, "data", "n" * 300 + ".png", _png_bytes()),
        c.get("/api/data/image", params={"path": "data/0.png", "size": "abc"}),
        c.post("/api/data/scan", json={"path": "data", "resolution": "abc"}, headers=W),
        c.post("/api/recipe/validate", content=deep, headers=W),
    ]
    for r in answers:
        _one_line_4xx(r, root)
    run_id = c.post("/api/runs", json={"data": _toy(c, "runs/r")}, headers=W).json()["id"]
    c.post(f"/api/runs/{run_id}/stop", headers=W)
    (root / "runs" / "r" / "checkpoints" / "step-000001").mkdir(parents=True)
    (root / "runs" / "r" / "checkpoints" / "step-000001" / "COMPLETE").write_text("")
    for steps in ("abc", 2.5, [3], True, -1):
        _one_line_4xx(c.post(f"/api/runs/{run_id}/resume", json={"max_steps": steps}, headers=W), root)
    assert studio.runs.get(run_id).status == "cancelled"


def test_files_the_studio_writes_follow_the_umask(world):  # noqa: F811
    root, _ = world
    c, _ = client(root)
    old = os.umask(0o022)
    try:
        assert _upload(c, "data", "new.png", _png_bytes()).status_code == 200
        assert c.put("/api/data/caption", json={"path": "data/new.png", "caption": "x"}, headers=W).status_code == 200
    finally:
        os.umask(old)
    assert oct((root / "data" / "new.png").stat().st_mode & 0o777) == oct(0o644)
    assert oct((root / "data" / "new.txt").stat().st_mode & 0o777) == oct(0o644)
