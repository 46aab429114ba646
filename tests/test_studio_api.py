"""The studio's API is safe by default: paths confined to --root, a token off loopback, capped uploads."""

from __future__ import annotations

import hashlib

import pytest

from tests.studio_helpers import W, client, png, snapshot, world  # noqa: F401  (fixture)

BAD_PATHS = {
    "dotdot": "../outside/secret.png",
    "dotdot_inside": "data/../../outside/secret.png",
    "absolute": "{outside}/secret.png",
    "home": "~/secret.png",
    "symlinked_file": "data/link.png",
    "symlinked_dir": "escape/secret.png",
    "dotdot_landing_inside": "data/../data/0.png",  # '..' is refused even where it would land inside
}
BAD_FOLDERS = {"dotdot": "../outside", "absolute": "{outside}", "symlinked_dir": "escape", "home": "~"}


def _requests(bad: str, bad_folder: str) -> dict:
    """One request per endpoint that takes a path from the browser."""
    return {
        "folders": ("GET", "/api/data/folders", {"params": {"path": bad_folder}}),
        "images": ("GET", "/api/data/images", {"params": {"path": bad_folder}}),
        "image": ("GET", "/api/data/image", {"params": {"path": bad, "size": "0"}}),
        "thumbnail": ("GET", "/api/data/image", {"params": {"path": bad}}),
        "caption": ("PUT", "/api/data/caption", {"json": {"path": bad, "caption": "pwned"}}),
        "scan": ("POST", "/api/data/scan", {"json": {"path": bad_folder, "resolution": 64}}),
        "upload": ("PUT", "/api/data/upload", {"params": {"folder": bad_folder, "name": "new.txt"}, "content": b"x"}),
        "caption_all": ("POST", "/api/data/caption-all", {"json": {"path": bad_folder}}),
    }


@pytest.mark.parametrize("case", BAD_PATHS)
def test_every_path_endpoint_refuses_escapes_and_touches_nothing_outside(world, case):  # noqa: F811
    root, outside = world
    before = snapshot(outside)
    c, studio = client(root)
    secret_png = (outside / "secret.png").read_bytes()
    bad = BAD_PATHS[case].format(outside=outside)
    bad_folder = BAD_FOLDERS.get(case, "escape").format(outside=outside)
    for name, (method, url, kw) in _requests(bad, bad_folder).items():
        r = c.request(method, url, headers=W, **kw)
        # without a captioning tool the button is refused before any path is read
        expected = 400 if name == "caption_all" and studio.caption_tool is None else 403
        assert r.status_code == expected, (name, r.status_code, r.text)
        assert b"secret caption" not in r.content and secret_png[16:] not in r.content
    assert snapshot(outside) == before


def test_recipe_paths_outside_the_root_are_errors_beside_their_keys(world):  # noqa: F811
    root, outside = world
    c, studio = client(root)
    data = c.get("/api/recipes/toy/lora.yaml").json()
    data["data"]["sources"] = [{"type": "folder", "path": "../outside"}, {"type": "folder", "path": "escape"},
                               {"type": "folder", "path": "data"}]  # data/ holds links out
    data["train"]["output_dir"] = str(outside / "run")
    data["data"]["cache_dir"] = "~/cache"
    data["export"] = {"name": "../x"}
    errors = c.post("/api/recipe/validate", json={"data": data}, headers=W).json()["errors"]
    keys = {e["key"] for e in errors}
    assert {"data.sources.0.path", "data.sources.1.path", "data.sources.2.path", "train.output_dir", "data.cache_dir",
            "export.name"} <= keys
    before = snapshot(outside)
    r = c.post("/api/runs", json={"data": data}, headers=W)
    assert r.status_code == 422 and {e["key"] for e in r.json()["errors"]} >= {"train.output_dir"}
    assert c.post("/api/recipe/check", json={"data": data}, headers=W).json()["summary"] == ""
    assert snapshot(outside) == before and studio.runs.list() == []


def test_hub_ids_and_the_toy_base_are_not_paths(world):  # noqa: F811
    from finetune.studio.recipes import check_recipe

    root, _ = world
    (root / "data" / "link.png").unlink()
    (root / "data" / "link.txt").unlink()
    data = {"model": {"base": "runwayml/stable-diffusion-v1-5", "config": "toy", "vae": "madebyollin/sdxl-vae"},
            "data": {"sources": [{"type": "hf", "path": "user/set"}, {"type": "folder", "path": "data"}]},
            "method": {"name": "lora"}, "train": {"output_dir": "runs/a"}}
    checked = check_recipe(data, root)
    assert checked.errors == []
    launch = checked.launch
    assert launch["model"] == data["model"] and launch["data"]["sources"][0]["path"] == "user/set"
    assert launch["data"]["sources"][1]["path"] == str(root / "data")
    assert launch["train"]["output_dir"] == str(root / "runs" / "a")
    assert checked.data == data  # what the form shows keeps the paths relative
    (root / "user" / "set").mkdir(parents=True)  # a folder by that name under the root: then it is the folder
    assert check_recipe(data, root).launch["data"]["sources"][0]["path"] == str(root / "user" / "set")
    data["model"]["base"] = "../models/sd"
    assert [e["key"] for e in check_recipe(data, root).errors] == ["model.base"]


def test_caption_edit_writes_the_sidecar_atomically_and_never_the_image(world):  # noqa: F811
    root, outside = world
    c, _ = client(root)
    image = (root / "data" / "0.png").read_bytes()
    r = c.put("/api/data/caption", json={"path": "data/0.png", "caption": "  a sks dog  "}, headers=W)
    assert r.status_code == 200, r.text
    assert (root / "data" / "0.txt").read_text() == "a sks dog\n"
    assert (root / "data" / "0.png").read_bytes() == image
    assert not [p for p in (root / "data").iterdir() if p.name.startswith(".")]  # no temp file left
    listing = c.get("/api/data/images", params={"path": "data"}).json()
    assert [i["caption"] for i in listing["images"]][:1] == ["a sks dog\n"]
    assert listing["outside_root"] == ["link.png"]  # named, never read
    png(root / "data" / "3.png")
    (root / "data" / "3.txt").symlink_to(outside / "secret.txt")  # a sidecar that is a link out
    before = snapshot(outside)
    assert c.put("/api/data/caption", json={"path": "data/3.png", "caption": "x"}, headers=W).status_code == 403
    assert c.put("/api/data/caption", json={"path": "data/0.txt", "caption": "x"}, headers=W).status_code == 400
    assert snapshot(outside) == before


def test_uploads_are_capped_checked_and_never_overwrite(world):  # noqa: F811
    import io

    from PIL import Image

    root, _ = world
    c, _ = client(root, max_upload=4096)
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (9, 9, 9)).save(buf, format="PNG")
    put = lambda name, body: c.put("/api/data/upload", params={"folder": "data", "name": name},  # noqa: E731
                                   content=body, headers=W)
    assert put("new.png", buf.getvalue()).status_code == 200
    assert (root / "data" / "new.png").read_bytes() == buf.getvalue()
    assert put("big.png", b"\0" * 5000).status_code == 413
    chunked = (b"\0" * 1000 for _ in range(5))  # no Content-Length: the cap holds while streaming
    assert put("big.png", chunked).status_code == 413
    assert put("bad.png", b"not an image").status_code == 400
    original = (root / "data" / "0.png").read_bytes()
    assert put("0.png", buf.getvalue()).status_code == 400
    assert (root / "data" / "0.png").read_bytes() == original
    assert put("../x.png", buf.getvalue()).status_code == 403
    assert put("run.sh", b"echo").status_code == 400
    # the bytes decide, not the name: a PNG is not a .jpg, nor a .py; a caption only beside its image, as text
    for name, body in (("yaml.py", buf.getvalue()), ("x.jpg", buf.getvalue()), ("orphan.txt", b"a cat"),
                       ("new.caption", b"\xff\xfe\x00"), ("new.yaml", b"a: 1")):
        assert put(name, body).status_code == 400, name
    assert put("new.txt", b"a cat").status_code == 200 and (root / "data" / "new.txt").read_text() == "a cat"
    assert put("new.txt", b"again").status_code == 400 and (root / "data" / "new.txt").read_text() == "a cat"
    names = sorted(p.name for p in (root / "data").iterdir())
    assert not {"big.png", "bad.png", "yaml.py", "x.jpg", "orphan.txt", "new.caption", "new.yaml"} & set(names)
    assert not [n for n in names if n.startswith(".")]
    huge = c.post("/api/recipe/validate", content=b"{" + b" " * (3 * 1024 * 1024) + b"}", headers=W)
    assert huge.status_code == 413


def test_loopback_bind_needs_no_token_but_refuses_foreign_hosts_and_bare_writes(world):  # noqa: F811
    root, _ = world
    c, studio = client(root)
    assert studio.token is None
    assert c.get("/api/info").status_code == 200
    assert c.get("/api/info", headers={"Host": "evil.example:8765"}).status_code == 403  # DNS rebinding
    r = c.put("/api/data/caption", json={"path": "data/0.png", "caption": "x"})  # no X-Studio header
    assert r.status_code == 403 and (root / "data" / "0.txt").read_text() == "caption 0\n"


def test_non_loopback_bind_requires_the_token_on_every_request(world):  # noqa: F811
    root, _ = world
    c, studio = client(root, host="0.0.0.0")
    token = studio.token
    assert token and len(token) >= 24
    for method, url in (("GET", "/"), ("GET", "/api/info"), ("GET", "/api/data/images?path=data"),
                        ("GET", "/static/js/main.js"), ("PUT", "/api/data/caption")):
        r = c.request(method, url, headers=W | {"Host": "192.0.2.1:8765"}, json={"path": "data/0.png", "caption": "x"})
        assert r.status_code == 401, (url, r.status_code)
    assert (root / "data" / "0.txt").read_text() == "caption 0\n"
    assert c.get("/api/info", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert c.get("/api/info", headers={"Authorization": f"Bearer {token}"}).status_code == 200
    r = c.get(f"/?token={token}", follow_redirects=False)  # the printed URL: the token moves into a cookie
    assert r.status_code == 303 and r.headers["location"] == "/" and "HttpOnly" in r.headers["set-cookie"]
    assert c.get("/api/info").status_code == 200  # the client kept the cookie
    assert c.put("/api/data/caption", json={"path": "data/0.png", "caption": "ok"}, headers=W).status_code == 200


def test_cli_prints_the_token_url_for_a_non_loopback_host(world, monkeypatch, capsys):  # noqa: F811
    import uvicorn
    from starlette.testclient import TestClient

    from finetune.run import main

    root, _ = world
    monkeypatch.chdir(root.parent)  # the server moves into a folder of its own; the test's folder comes back
    served = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: served.update(app=app, **kw))
    main(["studio", "--host", "0.0.0.0", "--port", "8123", "--root", str(root)])
    out = capsys.readouterr().out
    assert served["host"] == "0.0.0.0" and served["port"] == 8123
    token = out.split("?token=")[1].split()[0]
    c = TestClient(served["app"], base_url="http://192.0.2.1:8123")
    assert c.get("/api/info").status_code == 401
    assert c.get("/api/info", headers={"Authorization": f"Bearer {token}"}).status_code == 200
    main(["studio", "--root", str(root)])
    assert served["host"] == "127.0.0.1" and "?token=" not in capsys.readouterr().out


def test_cli_refuses_a_missing_root_in_one_line(tmp_path, capsys):
    from finetune.run import main

    with pytest.raises(SystemExit) as e:
        main(["studio", "--root", str(tmp_path / "nope")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and "--root" in err


def test_scan_reports_buckets_problems_duplicates_and_caption_statistics(world):  # noqa: F811
    root, outside = world
    c, _ = client(root)
    before = snapshot(outside)
    r = c.post("/api/data/scan", json={"path": "data", "resolution": 64}, headers=W)
    assert r.status_code == 403 and "data/link.png" in r.json()["error"]  # the scan would read the links
    assert snapshot(outside) == before
    (root / "data" / "link.png").unlink()
    (root / "data" / "link.txt").unlink()
    (root / "data" / "dup.png").write_bytes((root / "data" / "0.png").read_bytes())
    png(root / "data" / "tiny.png", size=16)
    (root / "data" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    (root / "data" / "1.txt").write_text("")
    s = c.post("/api/data/scan", json={"path": "data", "resolution": 64, "buckets": False}, headers=W).json()
    assert s["images"] == 4  # 0, 1, 2 and dup; tiny and broken are skipped
    assert s["buckets"] == [{"width": 64, "height": 64, "images": 4}]
    assert any("tiny.png" in p and "16x16" in p for p in s["skipped"])
    assert any("broken.png" in p for p in s["skipped"])
    assert s["duplicates"] == [["data/0.png", "data/dup.png"]]
    assert s["stats"]["images"] == 4 and s["stats"]["empty"] == 2  # 1.txt emptied, dup.png has no caption
    assert s["stats"]["words_max"] == 2
    assert "problems:" in s["summary"] and "identical images" in s["summary"]


def test_folder_listing_stays_inside_the_root(world):  # noqa: F811
    root, _ = world
    c, _ = client(root)
    (root / "sets" / "a").mkdir(parents=True)
    png(root / "sets" / "a" / "x.png")
    top = c.get("/api/data/folders", params={"path": ""}).json()
    assert [f["path"] for f in top["folders"]] == ["data", "sets"]  # 'escape' (a link out) is not offered
    assert c.get("/api/data/folders", params={"path": "sets"}).json()["folders"] == [
        {"path": "sets/a", "name": "a", "images": 1}]
    img = c.get("/api/data/image", params={"path": "sets/a/x.png", "size": "0"})
    assert hashlib.sha256(img.content).digest() == hashlib.sha256((root / "sets/a/x.png").read_bytes()).digest()
