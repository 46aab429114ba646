"""Every malformed request is a 4xx with one line: wrong types, wrong shapes, huge or odd strings, in every
field of every route (never a 500, never the root's absolute path, never a traceback)."""

from __future__ import annotations

import pytest

from tests.studio_helpers import W, client, world  # noqa: F401  (fixture)

ODD = [5, -1, 2.5, True, None, [], ["x"], {}, {"a": 1}, "", "\x00", "a\nb", "x" * 5000, "../x", "/etc", "~",
       ".studio", "1e999", "-", "--help"]
JSON_ROUTES = {  # route: the fields its body may hold
    ("PUT", "/api/data/caption"): ["path", "caption", "caption_ext"],
    ("POST", "/api/data/scan"): ["path", "resolution", "buckets", "caption_ext", "recursive"],
    ("POST", "/api/data/caption-all"): ["path", "prefix"],
    ("POST", "/api/recipe/validate"): ["data"],
    ("POST", "/api/recipe/check"): ["data"],
    ("POST", "/api/recipe/estimate"): ["data"],
    ("POST", "/api/runs"): ["data", "name", "accelerate_config", "parent"],
    ("POST", "/api/runs/{run}/resume"): ["max_steps"],
}
QUERY_ROUTES = {
    "/api/data/folders": ["path"],
    "/api/data/images": ["path", "caption_ext"],
    "/api/data/image": ["path", "size"],
}
PATH_ROUTES = ["/api/runs/{x}", "/api/runs/{x}/recipe", "/api/runs/{run}/files/{x}", "/api/jobs/{x}",
               "/api/recipes/{x}", "/api/runs/{x}/events"]
BAD_DATA = [{"model": 5}, {"data": {"sources": "x"}}, {"data": {"sources": [5]}}, {"train": {"output_dir": 5}},
            {"data": {"sources": [{"type": "folder", "path": ["x"]}]}}, {"method": {"name": {"x": 1}}},
            {"validation": {"clip_model": None}}, {"data": {"masks": {"folder": 3}}}, {"x" * 300: 1}]


def _ok(r, root, what) -> None:
    assert 400 <= r.status_code < 500, (what, r.status_code, r.text[:300])
    assert str(root) not in r.text and "Traceback" not in r.text, (what, r.text[:300])
    if r.headers.get("content-type", "").startswith("application/json"):
        assert "\n" not in r.json()["error"], (what, r.json()["error"][:300])


@pytest.fixture()
def studio(world, tmp_path):  # noqa: F811
    from tests.studio_helpers import CAPTIONER

    root, _ = world
    tools = tmp_path / "tools"
    tools.mkdir()
    (tools / "caption.py").write_text(CAPTIONER)
    c, s = client(root, tools_dir=tools)
    data = c.get("/api/recipes/toy/lora.yaml").json()
    data["train"]["output_dir"] = "runs/r"
    run_id = c.post("/api/runs", json={"data": data}, headers=W).json()["id"]
    c.post(f"/api/runs/{run_id}/stop", headers=W)
    (root / "runs" / "r" / "checkpoints" / "step-000001").mkdir(parents=True)
    (root / "runs" / "r" / "checkpoints" / "step-000001" / "COMPLETE").write_text("")
    return c, s, root, run_id


@pytest.mark.parametrize("route", JSON_ROUTES, ids=lambda r: r[1])
def test_every_json_field_of_every_route_refuses_odd_values(studio, route):
    c, s, root, run_id = studio
    method, url = route
    url = url.format(run=run_id)
    for raw in (b"not json", b"[]", b'"s"', b"1e999999", b"{" * 5000, b'{"a": ' + b"[" * 200 + b"]" * 200 + b"}"):
        _ok(c.request(method, url, content=raw, headers=W), root, (url, raw[:20]))
    for field in JSON_ROUTES[route]:
        values = ODD + (BAD_DATA if field == "data" else [])
        for value in values:
            r = c.request(method, url, json={field: value}, headers=W)
            if r.status_code == 200:  # a value that is fine there (an empty prefix, a null parent)
                continue
            _ok(r, root, (url, field, str(value)[:40]))
    assert [r.id for r in s.runs.list()] == [run_id]  # nothing odd was queued


@pytest.mark.parametrize("url", QUERY_ROUTES)
def test_every_query_parameter_refuses_odd_values(studio, url):
    c, _, root, _ = studio
    for field in QUERY_ROUTES[url]:
        for value in ODD:
            if isinstance(value, (list, dict)) or value is None:
                continue
            r = c.get(url, params={"path": "data", field: str(value)})
            if r.status_code != 200:
                _ok(r, root, (url, field, str(value)[:40]))


def test_every_path_parameter_refuses_odd_values(studio):
    c, _, root, run_id = studio
    for template in PATH_ROUTES:
        for value in ("nope", "..%2F..%2Fetc", "%00", "x" * 3000, ".studio", "%2Fetc%2Fpasswd", "a%0Ab"):
            url = template.format(run=run_id, x=value)
            r = c.get(url)
            _ok(r, root, url)
