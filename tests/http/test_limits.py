"""The server's own options reach every decoder: --max-keys and --max-body bound what a request
may build, for pickle, JSON and OIP alike, and the server keeps serving after each refusal."""

from __future__ import annotations

import io
import json
import pickle
import zipfile

import numpy as np

from studioserve.models import IdentityModel
from studioserve.wire.oip_codec import encode_infer_request
from tests.helpers import error_of, raw_post, running_server


def test_max_keys_is_the_servers_option_for_every_format() -> None:
    with running_server("ident", model=IdentityModel(source="none"), max_keys=8) as server:
        few = {f"k{i}": np.float32(i) for i in range(8)}
        assert raw_post(server.url, pickle.dumps(few))[0] == 200
        many = {f"k{i}": i for i in range(50)}
        status, _, body = raw_post(server.url, pickle.dumps(many))
        assert status == 413
        assert "--max-keys" in error_of(body)["message"]
        status, _, body = raw_post(
            server.url, json.dumps(many).encode(), {"Content-Type": "application/json"}
        )
        assert status == 413
        assert "--max-keys" in error_of(body)["message"]
        assert raw_post(server.url, pickle.dumps(few))[0] == 200  # still serving


def test_what_a_body_may_build_follows_max_body() -> None:
    """A small --max-body lowers the cap on what a decoded body may build (413, not 500)."""
    with running_server("ident", model=IdentityModel(source="none"), max_body=1 << 20) as server:
        body, headers = encode_infer_request({"x": np.zeros((1, 4), np.float32)})
        status, _, _ = raw_post(server.url, body, headers, path="/v2/models/ident/infer")
        assert status == 200
        # a tiny npy header that claims 2**40 float64s: refused before anything is allocated
        header = b"{'descr': '<f8', 'fortran_order': False, 'shape': (1099511627776,), }"
        npy = b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w") as zf:
            zf.writestr("x.npy", npy)
        status, _, body = raw_post(
            server.url, buf.getvalue(), {"Content-Type": "application/x-npz"}
        )
        assert status in (400, 413), body
        assert raw_post(server.url, pickle.dumps({"a": np.arange(3)}))[0] == 200
