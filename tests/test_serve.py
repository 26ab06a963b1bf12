"""The viewer's JSON API through Starlette's TestClient: answers, limits and 4xx errors."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import jsonschema
import numpy as np
import pytest
import torch
from starlette.applications import Starlette
from starlette.routing import Route
from starlette.testclient import TestClient
from typer.testing import CliRunner

import headatlas as ha
from conftest import XSS
from headatlas.cli import app as cli_app
from headatlas.serve import DEFAULT_HOST, atlas_model, create_app
from headatlas.serve.app import MAX_BODY_BYTES
from tiny_models import eager_attentions


@pytest.fixture(scope="module")
def atlas(tiny_atlas_dir: Path) -> ha.Atlas:
    return ha.Atlas.load(tiny_atlas_dir)


@pytest.fixture(scope="module")
def app(atlas: ha.Atlas, tiny_loaded: ha.LoadedModel) -> Starlette:
    return create_app(atlas, tiny_loaded, max_tokens=64, max_chars=2000, max_heads=4)


@pytest.fixture(scope="module")
def client(app: Starlette) -> TestClient:
    return TestClient(app, base_url=LOCAL)


LOCAL = "http://127.0.0.1"
"""The viewer answers only local Host headers (and the address it binds)."""


def _error(response, status: int) -> str:  # type: ignore[no-untyped-def]
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"error"} and "Traceback" not in body["error"]
    return str(body["error"])


def test_page_and_security_headers(client: TestClient) -> None:
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    csp = page.headers["content-security-policy"]
    assert "default-src 'none'" in csp and "connect-src 'self'" in csp and "script-src 'sha256-" in csp
    assert "https://" not in page.text and "<script src" not in page.text.lower()


def test_info_atlas_heads(client: TestClient, tiny_loaded: ha.LoadedModel) -> None:
    info = client.get("/api/info").json()
    assert info["live"] and info["atlas"]
    assert info["model"]["n_layers"] == 3 and info["limits"]["max_tokens"] == 64
    table = client.get("/api/atlas").json()
    assert len(table["heads"]["layer"]) == 12 and "induction" in table["heads"]["scores"]
    ranked = client.get("/api/heads", params={"score": "induction", "top": 5}).json()["heads"]
    values = [h["scores"]["induction"] for h in ranked]
    assert len(ranked) == 5 and values == sorted(values, reverse=True)
    assert "bogus" in _error(client.get("/api/heads", params={"score": "bogus"}), 400)
    assert "unknown role" in _error(client.get("/api/heads", params={"role": "bogus"}), 400)
    assert "integer" in _error(client.get("/api/heads", params={"top": "many"}), 400)
    assert "unknown parameter" in _error(client.get("/api/heads", params={"limit": "3"}), 400)
    with_role = client.get("/api/heads", params={"role": "sink"}).json()["heads"]
    assert all("sink" in h["roles"] for h in with_role)


def test_attention_is_exact(client: TestClient, tiny_loaded: ha.LoadedModel) -> None:
    text = "The dog ran to the park with the ball."
    body = client.post(
        "/api/attention", json={"text": text, "heads": [{"layer": 2, "head": 3}, {"layer": 0, "head": 1}]}
    )
    assert body.status_code == 200, body.text
    data = body.json()
    ids = torch.tensor([tiny_loaded.tokenizer(text, add_special_tokens=False)["input_ids"]])
    ids = torch.cat([torch.tensor([[tiny_loaded.tokenizer.bos_token_id]]), ids], dim=1)
    assert data["n_tokens"] == ids.shape[1] == len(data["tokens"]) and data["causal"]
    reference = eager_attentions(tiny_loaded.model, ids, torch.ones_like(ids))
    for item in data["maps"]:
        got = np.asarray(item["attention"])
        want = reference[item["layer"]][0, item["head"]].numpy()
        np.testing.assert_allclose(got, want, atol=2e-3)  # fp16 cache, 4 digits
        assert item["kv_head"] == item["head"] // 2
    packed = client.post(
        "/api/attention", json={"text": text, "heads": [{"layer": 2, "head": 3}], "format": "uint8"}
    )
    raw = np.frombuffer(base64.b64decode(packed.json()["maps"][0]["data"]), dtype=np.uint8)
    n = data["n_tokens"]
    np.testing.assert_allclose(raw.reshape(n, n) / 255, reference[2][0, 3].numpy(), atol=3 / 255)


def test_xss_text_comes_back_as_plain_strings(client: TestClient) -> None:
    data = client.post("/api/attention", json={"text": XSS, "heads": [{"layer": 0, "head": 0}]}).json()
    assert XSS in "".join(data["tokens"])


@pytest.mark.parametrize(
    ("payload", "status", "needle"),
    [
        ([1, 2], 422, "JSON object"),
        ({"heads": [{"layer": 0, "head": 0}]}, 422, "text"),
        ({"text": "   ", "heads": [{"layer": 0, "head": 0}]}, 422, "text"),
        ({"text": "hi", "heads": []}, 422, "heads"),
        ({"text": "hi", "heads": [{"layer": 0}]}, 422, "{layer, head}"),
        ({"text": "hi", "heads": [{"layer": 3, "head": 0}]}, 422, "out of range"),
        ({"text": "hi", "heads": [{"layer": 0, "head": -1}]}, 422, "out of range"),
        ({"text": "hi", "heads": [{"layer": True, "head": 0}]}, 422, "integer"),
        ({"text": "hi", "heads": [{"layer": "0", "head": 0}]}, 422, "integer"),
        ({"text": "hi", "heads": [{"layer": 0, "head": 0}] * 5}, 422, "at most 4"),
        ({"text": "hi", "heads": [{"layer": 0, "head": 0}], "format": "png"}, 422, "format"),
        ({"text": "hi", "heads": [{"layer": 0, "head": 0}], "extra": 1}, 422, "unknown field"),
        ({"text": "word " * 100, "heads": [{"layer": 0, "head": 0}]}, 413, "over the limit of 64"),
        ({"text": "x" * 2001, "heads": [{"layer": 0, "head": 0}]}, 413, "characters"),
    ],
)
def test_bad_attention_requests(client: TestClient, payload: object, status: int, needle: str) -> None:
    assert needle in _error(client.post("/api/attention", json=payload), status)


def test_bad_bodies_methods_and_paths(client: TestClient) -> None:
    as_json = {"content-type": "application/json"}
    assert "valid JSON" in _error(client.post("/api/attention", content=b"{not json", headers=as_json), 400)
    assert "valid JSON" in _error(client.post("/api/attention", content=b"\xff\xfe", headers=as_json), 400)
    big = b'{"text": "' + b"a" * (MAX_BODY_BYTES + 10) + b'"}'
    assert "over" in _error(client.post("/api/attention", content=big, headers=as_json), 413)
    _error(client.get("/api/attention"), 405)
    _error(client.get("/no/such/page"), 404)
    assert "nests too deeply" in _error(
        client.post("/api/attention", content=b"[" * 100_000, headers=as_json), 400
    )
    lone = b'{"text": "a \\ud800 b", "heads": [{"layer": 0, "head": 0}]}'
    assert "surrogate" in _error(client.post("/api/attention", content=lone, headers=as_json), 422)


def test_a_cross_site_form_post_or_a_rebound_host_is_refused(client: TestClient) -> None:
    form = {"content-type": "application/x-www-form-urlencoded"}
    body = b'{"text": "hi", "heads": [{"layer": 0, "head": 0}]}'
    assert "application/json" in _error(client.post("/api/attention", content=body, headers=form), 415)
    assert "Host" in _error(client.get("/api/info", headers={"host": "evil.example:8765"}), 400)
    for host in ("127.0.0.1:8765", "localhost", "[::1]:8765"):
        assert client.get("/api/info", headers={"host": host}).status_code == 200, host


def test_the_bound_host_is_answered_and_another_models_atlas_refused(
    atlas: ha.Atlas, tiny_loaded: ha.LoadedModel
) -> None:
    lan = TestClient(create_app(atlas, tiny_loaded, hosts=("10.1.2.3",)), base_url="http://10.1.2.3:8765")
    assert lan.get("/api/info").status_code == 200
    from tiny_models import BUILDERS, make_tokenizer

    other = ha.load(BUILDERS["gpt2"](0), tokenizer=make_tokenizer())
    with pytest.raises(ha.HeadatlasError, match="layers"):
        create_app(atlas, other)


def test_a_port_in_use_is_one_line() -> None:
    import socket

    from headatlas.serve import check_port

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ha.HeadatlasError, match=f"port {port} on 127.0.0.1 is in use"):
            check_port("127.0.0.1", port)


def test_one_model_run_at_a_time(atlas: ha.Atlas, tiny_loaded: ha.LoadedModel) -> None:
    app = create_app(atlas, tiny_loaded, busy_timeout=0.05)
    client = TestClient(app, base_url=LOCAL)
    state = app.state.viewer
    assert state.lock.acquire(timeout=1)
    try:
        assert "busy" in _error(
            client.post("/api/attention", json={"text": "hi there", "heads": [{"layer": 0, "head": 0}]}), 429
        )
    finally:
        state.lock.release()
    ok = client.post("/api/attention", json={"text": "hi there", "heads": [{"layer": 0, "head": 0}]})
    assert ok.status_code == 200


def test_atlas_only_and_model_only(atlas: ha.Atlas, tiny_loaded: ha.LoadedModel) -> None:
    only_atlas = TestClient(create_app(atlas, None), base_url=LOCAL)
    assert only_atlas.get("/").status_code == 200
    assert only_atlas.get("/api/info").json()["live"] is False
    assert "no model" in _error(
        only_atlas.post("/api/attention", json={"text": "hi", "heads": [{"layer": 0, "head": 0}]}), 503
    )
    only_model = TestClient(create_app(None, tiny_loaded), base_url=LOCAL)
    assert "no atlas" in _error(only_model.get("/api/atlas"), 404)
    assert (
        only_model.post("/api/attention", json={"text": "hi", "heads": [{"layer": 0, "head": 0}]}).status_code
        == 200
    )
    with pytest.raises(ha.HeadatlasError, match="needs an atlas"):
        create_app(None, None)


def test_unexpected_failure_is_a_json_500(
    atlas: ha.Atlas, tiny_loaded: ha.LoadedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    import headatlas.report.maps as maps  # the viewer imports it (and torch) only for live attention

    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("secret internals")

    monkeypatch.setattr(maps, "layer_maps", broken)
    client = TestClient(create_app(atlas, tiny_loaded), raise_server_exceptions=False, base_url=LOCAL)
    response = client.post("/api/attention", json={"text": "hi", "heads": [{"layer": 0, "head": 0}]})
    assert "secret" not in _error(response, 500)


PAGES = {("get", "/")}
"""Routes that answer an HTML page or a static asset, not JSON: the only routes the OpenAPI
document leaves out."""

HTTP_METHODS = ("get", "put", "post", "delete", "options", "head", "patch", "trace")

HEAD = [{"layer": 0, "head": 0}]
AS_JSON = {"content-type": "application/json"}
AS_FORM = {"content-type": "application/x-www-form-urlencoded"}

EXAMPLES: dict[tuple[str, str], list[tuple[str, int, dict[str, Any]]]] = {
    ("get", "/openapi.json"): [("both", 200, {})],
    ("get", "/api/info"): [("both", 200, {}), ("atlas", 200, {}), ("model", 200, {})],
    ("get", "/api/atlas"): [("both", 200, {}), ("atlas", 200, {}), ("model", 404, {})],
    ("get", "/api/heads"): [
        ("both", 200, {}),
        ("both", 200, {"params": {"score": "induction", "top": 5}}),
        ("atlas", 200, {"params": {"role": "previous-token", "top": 12}}),
        ("both", 400, {"params": {"top": "many"}}),
        ("model", 404, {}),
    ],
    ("post", "/api/attention"): [
        ("both", 200, {"json": {"text": "The dog ran.", "heads": [{"layer": 2, "head": 3}, *HEAD]}}),
        ("both", 200, {"json": {"text": "The dog ran.", "heads": HEAD, "format": "uint8"}}),
        ("model", 200, {"json": {"text": XSS, "heads": HEAD, "format": "float"}}),
        ("both", 400, {"content": b"{not json", "headers": AS_JSON}),
        ("both", 413, {"content": b'{"text": "' + b"a" * (MAX_BODY_BYTES + 10) + b'"}', "headers": AS_JSON}),
        ("both", 415, {"content": b'{"text": "hi", "heads": []}', "headers": AS_FORM}),
        ("both", 422, {"json": {"text": "hi", "heads": []}}),
        ("busy", 429, {"json": {"text": "hi", "heads": HEAD}}),
        ("atlas", 503, {"json": {"text": "hi", "heads": HEAD}}),
    ],
}
"""``(app, status, request)`` for each documented operation, drawing every status it declares. The
apps: ``both`` (atlas and live model), ``atlas`` (no model), ``model`` (no atlas), ``busy`` (both,
its model lock held)."""


@pytest.fixture(scope="module")
def spec(app: Starlette, client: TestClient) -> dict[str, Any]:
    """The OpenAPI document as the app serves it, fetched from the route that serves it."""
    response = client.get(app.url_path_for("openapi"))
    assert response.status_code == 200 and response.headers["content-type"] == "application/json"
    document: dict[str, Any] = response.json()
    assert document["openapi"].startswith("3.1.")
    return document


def _operations(spec: dict[str, Any]) -> dict[tuple[str, str], dict[str, Any]]:
    """Return ``{(method, path): operation}`` for every operation the document declares."""
    return {
        (method, path): operation
        for path, item in spec["paths"].items()
        for method, operation in item.items()
        if method in HTTP_METHODS
    }


def _validator(spec: dict[str, Any], schema: dict[str, Any]) -> jsonschema.Draft202012Validator:
    """Return a validator of ``schema``, a schema in ``spec`` whose ``$ref``s point into ``spec``."""
    rooted = {**schema, "components": spec.get("components", {})}
    jsonschema.Draft202012Validator.check_schema(rooted)
    return jsonschema.Draft202012Validator(rooted)


def test_openapi_documents_every_route_and_serves_every_documented_path(
    app: Starlette, spec: dict[str, Any]
) -> None:
    served: set[tuple[str, str]] = set()
    for route in app.routes:
        assert isinstance(route, Route), f"{route!r} is not a plain route: list static mounts in PAGES"
        served |= {(m.lower(), route.path) for m in route.methods or () if m != "HEAD"}
    documented = set(_operations(spec))
    assert served >= PAGES, "PAGES lists a route the app does not serve"
    assert not PAGES & documented
    assert served - PAGES == documented, (
        f"undocumented: {served - PAGES - documented}, not served: {documented - served}"
    )
    client = TestClient(app, base_url=LOCAL)
    for _, path in PAGES:
        assert client.get(path).headers["content-type"].startswith("text/html"), path


def test_answers_match_their_openapi_schemas(
    app: Starlette, spec: dict[str, Any], atlas: ha.Atlas, tiny_loaded: ha.LoadedModel
) -> None:
    """Every documented operation, called on the apps, answers JSON that the schema the document
    declares for its status accepts (the requests of its 200s match the documented request too)."""
    operations = _operations(spec)
    assert set(EXAMPLES) == set(operations), "give EXAMPLES requests for each documented operation"
    for (method, path), calls in EXAMPLES.items():
        declared = {int(status) for status in operations[method, path]["responses"]}
        assert {status for _, status, _ in calls} == declared, f"{method} {path}: draw each declared status"
    apps = {
        "both": app,
        "atlas": create_app(atlas, None),
        "model": create_app(None, tiny_loaded),
        "busy": create_app(atlas, tiny_loaded, busy_timeout=0.01),
    }
    clients = {name: TestClient(served, base_url=LOCAL) for name, served in apps.items()}
    busy = apps["busy"].state.viewer.lock
    assert busy.acquire(timeout=1)
    try:
        for (method, path), calls in EXAMPLES.items():
            operation = operations[method, path]
            for name, status, request in calls:
                where = f"{method.upper()} {path} on the {name!r} app ({request})"[:300]
                response = clients[name].request(method.upper(), path, **request)
                assert response.status_code == status, f"{where}: {response.text[:300]}"
                assert response.headers["content-type"] == "application/json", where
                schema = operation["responses"][str(status)]["content"]["application/json"]["schema"]
                errors = [
                    f"{e.json_path}: {e.message}"[:300]
                    for e in _validator(spec, schema).iter_errors(response.json())
                ]
                assert not errors, f"{where} answered {status} off its schema: {errors[:3]}"
                if status == 200 and "json" in request:
                    sent = operation["requestBody"]["content"]["application/json"]["schema"]
                    assert not list(_validator(spec, sent).iter_errors(request["json"])), where
                if status == 200 and "params" in request:
                    assert set(request["params"]) <= {p["name"] for p in operation.get("parameters", [])}
    finally:
        busy.release()


def test_serve_binds_localhost_by_default(tiny_atlas_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import headatlas.serve as serving

    seen: dict[str, object] = {}
    monkeypatch.setattr(serving, "run", lambda app, host, port: seen.update(host=host, port=port, app=app))
    result = CliRunner().invoke(cli_app, ["serve", str(tiny_atlas_dir)])
    assert result.exit_code == 0, result.output
    assert seen["host"] == DEFAULT_HOST == "127.0.0.1" and seen["port"] == 8765
    assert "pass --model" in result.output  # scanned from an in-memory model: nothing to reload
    bad = CliRunner().invoke(cli_app, ["serve", str(tiny_atlas_dir), "--port", "0"])
    assert bad.exit_code == 2 and "port" in bad.output


def test_atlas_model(atlas: ha.Atlas) -> None:
    assert atlas_model(atlas) is None  # scanned from an in-memory model
    other = ha.Atlas(atlas.table, {"model": {"source": "/some/where/model"}})
    assert atlas_model(other) == "/some/where/model"


def test_atlas_model_names_packaged_models(atlas: ha.Atlas, tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """An atlas scanned from a packaged model's converted cache reloads by the packaged name, so its
    sha256 (recorded from the GGUF) matches again."""
    monkeypatch.setenv("HEADATLAS_CACHE", str(tmp_path))
    cached = tmp_path / "models" / "gemma3-270m-fp32"
    meta = {"model": {"source": str(cached), "name": "gemma-3-270m"}}
    assert atlas_model(ha.Atlas(atlas.table, meta)) == "gemma3-270m"
    renamed = {"model": {"source": str(cached), "name": "something-else"}}
    assert atlas_model(ha.Atlas(atlas.table, renamed)) == str(cached)
