"""The status page at ``GET /`` in a real headless Chromium, after real requests.

Chromium is Debian's ``chromium`` package (``.ci/run`` installs it); without it these tests
skip. It runs with ``--dump-dom`` after a virtual-time budget, so the page's script has loaded,
rendered the embedded facts and polled the server before the DOM is printed.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import subprocess
import threading
import time
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from studioserve.models import IdentityModel, PipeModel
from studioserve.pipelines import ModelPipe
from studioserve.tensors import TensorSpec
from studioserve.wire.oip_codec import encode_infer_request
from tests.helpers import raw_post, running_server

W = np.ones((16, 4), np.float32)


def _chromium() -> str:
    for name in ("chromium", "chromium-browser"):
        path = shutil.which(name)
        if path:
            return path
    pytest.skip("chromium is not installed (apt-get install -y chromium; .ci/run does)")


def dump_dom(url: str, tmp_path: Path, budget_ms: int = 3000) -> str:
    """The DOM of ``url`` after ``budget_ms`` of virtual time, as Chromium serialises it."""
    profile = tmp_path / "chromium-profile"
    profile.mkdir(exist_ok=True)
    cmd = [
        _chromium(),
        "--headless",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-extensions",
        "--disable-dev-shm-usage",
        f"--user-data-dir={profile}",
        f"--virtual-time-budget={budget_ms}",
        "--dump-dom",
        url,
    ]
    if os.geteuid() == 0:
        cmd.insert(2, "--no-sandbox")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


class Dom(HTMLParser):
    """Elements by id (attributes and text) and every element's attributes, from a DOM dump."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.by_id: dict[str, dict[str, Any]] = {}
        self.elements: list[tuple[str, dict[str, str]]] = []
        self._open: list[dict[str, Any]] = []
        self.feed(text)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        self.elements.append((tag, a))
        for open_node in self._open:  # cells and items read as separate words
            open_node["text"] += " "
        node = {"tag": tag, "attrs": a, "text": ""}
        if "id" in a:
            self.by_id[a["id"]] = node
        if tag not in ("path", "line", "rect", "br", "meta", "i"):
            self._open.append(node)

    def handle_endtag(self, tag: str) -> None:
        for i in range(len(self._open) - 1, -1, -1):
            if self._open[i]["tag"] == tag:
                del self._open[i:]
                break

    def handle_data(self, data: str) -> None:
        for node in self._open:
            node["text"] += data

    def text(self, id_: str) -> str:
        return " ".join(str(self.by_id[id_]["text"]).split())

    def attr(self, id_: str, name: str) -> str:
        return str(self.by_id[id_]["attrs"].get(name, ""))


def _model() -> PipeModel:
    pipe = ModelPipe(name="page")
    pipe.add(lambda x: x @ W, max_batch_size=16, name="matmul")
    return PipeModel(
        pipe,
        source="page-test",
        inputs=[TensorSpec("x", (16,), "float32")],
        outputs=[TensorSpec("y", (4,), "float32")],
        load_seconds=0.5,
    )


def _status(url: str) -> dict[str, Any]:
    status, _, body = raw_post(url, None, method="GET", path="/", headers={"Accept": "*/*"})
    assert status == 200
    info: dict[str, Any] = json.loads(body)
    return info


def _wait_for_series(url: str, requests: int) -> None:
    """Wait until the live series (whole seconds only) has counted ``requests``."""
    deadline = time.monotonic() + 10
    while sum(_status(url)["live"]["series"]["requests"]) < requests:
        assert time.monotonic() < deadline, "the live series never counted the requests"
        threading.Event().wait(0.05)


def test_page_shows_the_model_and_live_figures_after_real_requests(tmp_path: Path) -> None:
    with running_server("page-exp", model=_model(), killafter=3600, max_batch_size=16) as server:
        url = server.url
        for n in (None, None, 3, None, 2):
            x = np.ones((16,) if n is None else (n, 16), np.float32)
            assert raw_post(url, pickle.dumps({"k": x}))[0] == 200
        body, headers = encode_infer_request({"x": np.ones((4, 16), np.float32)})
        for _ in range(2):
            assert raw_post(url, body, headers, path="/v2/models/page-exp/infer")[0] == 200
        assert raw_post(url, pickle.dumps({"k": np.ones(3, np.float32)}))[0] == 422
        _wait_for_series(url, 8)
        items = server.service.model.pipe.stats().stages["matmul"].items
        dom = Dom(dump_dom(url + "/", tmp_path))

    assert dom.text("ready") == "ready"
    body_attrs = next(a for tag, a in dom.elements if tag == "body")
    assert int(body_attrs["data-updates"]) >= 2  # rendered from the page, then from a poll
    assert dom.text("conn") == "live"
    # the model, its signature and the batching settings
    assert dom.text("model-kind") == "pipe"
    signature = dom.text("signature")
    assert "input x float32 (n, 16)" in signature
    assert "output y float32 (n, 4)" in signature
    assert "max batch size 16" in dom.text("batching")
    stage = dom.text("stages")
    assert re.search(rf"matmul 1 16 16 {items} \d+ 0", stage), stage
    # live figures: 8 inference requests, 1 of them refused
    assert dom.attr("total-requests", "data-value") == "8"
    assert dom.attr("errors", "data-value") == "1"
    assert float(dom.attr("rps", "data-value")) > 0
    assert float(dom.attr("p50", "data-value")) > 0
    assert float(dom.attr("batch-mean", "data-value")) >= 1
    # charts drawn from the series: lines with points, and one bar per batch size seen
    assert int(dom.attr("chart-throughput", "data-points")) > 0
    assert int(dom.attr("chart-latency", "data-points")) > 0
    assert int(dom.attr("chart-batch", "data-points")) > 0
    assert int(dom.attr("chart-batch-hist", "data-bars")) >= 3  # sizes 1, 2, 3 and 4 at least
    paths = [a for tag, a in dom.elements if tag == "path" and a.get("data-series") == "req/s"]
    assert paths
    assert paths[0]["d"].startswith("M")
    # the inactivity countdown ticks down from --killafter
    seconds = int(dom.attr("countdown", "data-seconds"))
    assert 3500 < seconds <= 3600
    assert re.fullmatch(r"(59:\d\d|1:00:00)", dom.text("countdown")), dom.text("countdown")


def test_page_of_a_model_without_pipe_or_signature(tmp_path: Path) -> None:
    model = IdentityModel(source="nothing-here")
    with running_server("ident", model=model) as server:
        assert raw_post(server.url, pickle.dumps({"a": np.arange(3)}))[0] == 200
        dom = Dom(dump_dom(server.url + "/", tmp_path, budget_ms=1500))
    assert dom.text("conn") == "live"
    assert dom.text("model-kind") == "identity"
    assert "any (the model has no declared signature)" in dom.text("signature")
    assert "no pipe" in dom.text("stages")
    assert dom.attr("total-requests", "data-value") == "1"
    assert dom.text("countdown") == "off"
    assert dom.attr("chart-batch-hist", "data-bars") == "0"


def test_html_only_for_browsers_and_nothing_from_elsewhere() -> None:
    with running_server("neg", model=_model()) as server:
        url = server.url
        for accept in (None, "*/*", "application/json"):
            headers = {"Accept": accept} if accept else {}
            status, h, body = raw_post(url, None, headers, method="GET")
            assert status == 200
            assert h["content-type"] == "application/json"
            info = json.loads(body)
            assert info["model"]["kind"] == "pipe"
            assert info["in_flight"] == 0
        browser = "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"
        status, h, body = raw_post(url, None, {"Accept": browser}, method="GET")
        assert status == 200
        assert h["content-type"].startswith("text/html")
        page = body.decode()
        # POST / is still inference
        assert raw_post(url, pickle.dumps({"k": np.ones(16, np.float32)}))[0] == 200
    assert "<script>" in page
    assert "<style>" in page
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page)
    assert "http://" not in page.replace("http://www.w3.org/2000/svg", "")


BROWSER = "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"


def test_with_auth_a_browser_gets_a_sign_in_page_that_tells_nothing() -> None:
    with running_server("secret-exp", model=_model(), token="tok-123") as server:
        url = server.url
        status, h, body = raw_post(url, None, {"Accept": BROWSER}, method="GET")
        assert status == 401
        assert h["content-type"].startswith("text/html")
        assert h["www-authenticate"].startswith("Bearer")
        page = body.decode()
        # programs still get the JSON error, and a good header still gets the page
        status, h, jbody = raw_post(url, None, {"Accept": "application/json"}, method="GET")
        assert status == 401
        assert json.loads(jbody)["error"]["type"] == "unauthorized"
        good = {"Accept": BROWSER, "Authorization": "Bearer tok-123"}
        status, _, full = raw_post(url, None, good, method="GET")
        assert status == 200
        assert b"page-test" in full
    assert 'id="sign-in"' in page
    for secret in ("secret-exp", "page-test", "matmul", "tok-123", "float32"):
        assert secret not in page
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page)


def test_with_auth_the_page_works_in_a_browser_given_the_token(tmp_path: Path) -> None:
    with running_server("auth-page", model=_model(), token="tok-456") as server:
        url = server.url
        good = {"Authorization": "Bearer tok-456"}
        assert raw_post(url, pickle.dumps({"k": np.ones(16, np.float32)}), good)[0] == 200
        dom = Dom(dump_dom(url + "/#token=tok-456", tmp_path))
        wrong = Dom(dump_dom(url + "/#token=nope", tmp_path, budget_ms=1500))
    # the real page, shown by the sign-in script, polling with the header
    assert dom.text("model-kind") == "pipe"
    assert dom.text("conn") == "live"
    body_attrs = next(a for tag, a in dom.elements if tag == "body")
    assert int(body_attrs["data-updates"]) >= 2
    assert dom.attr("total-requests", "data-value") == "1"
    # a wrong token: still the sign-in form, with the reason
    assert "sign-in" in wrong.by_id
    assert "wrong token" in wrong.text("sign-in-error")
    assert "model-kind" not in wrong.by_id
