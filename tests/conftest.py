"""Test session setup shared by every test file.

The tests' tensors are small: one intra-op thread computes them as fast as two, and on a busy
machine OpenMP threads that wait on each other make small convolutions tens of times slower.

Without a GPU, the Triton kernels run in Triton's numpy interpreter. TRITON_INTERPRET is read when
`triton.jit` decorates a kernel, i.e. when `kernels` is first imported, so it is set here, before
any test module is collected. With a GPU it stays unset and the same tests run natively. The
interpreter takes seconds per kernel call, so on a CPU the whole models run on the PyTorch path
(NANOPITI_KERNELS=0, whatever the shell says); test_kernels.py and test_ops.py turn the kernels on
themselves, at tiny shapes.

`golden` opens the golden values of the original GLIDE and PITI code in tests/golden/ (see its
README.md): the tests need nothing outside the repository, and a missing file fails, never skips.

`file_server` serves bytes over HTTP on localhost, for the downloader's tests (tests never reach
the internet).
"""

import http.server
import json
import math
import os
import threading
import zlib
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
    os.environ["NANOPITI_KERNELS"] = "0"

torch.set_num_threads(1)

GOLDEN = Path(__file__).with_name("golden")


def golden_param(name, shape, seed):
    """The weight rule of tests/golden/README.md: every parameter rebuilt from its name and a seed."""
    g = torch.Generator().manual_seed(seed * 1000003 + zlib.crc32(name.encode()))
    w = torch.randn(shape, generator=g)
    if len(shape) >= 2 and "embedding" not in name and "cls_token" not in name:
        w = w / math.sqrt(math.prod(shape[1:]))  # matrices and conv kernels: 1/sqrt(fan_in)
    elif name.endswith("weight") and len(shape) == 1:
        w = 1 + 0.1 * w  # norm scales
    else:
        w = 0.1 * w  # biases, embeddings, cls token
    return w.half().float()  # the original ran on fp16-rounded values


class Golden:
    """golden.path(file), golden.json(file), golden.load(file), and golden.model(name): a reference model's
    file with its `state_dict` rebuilt by the weight rule and its float inputs cast to fp32."""

    def path(self, name):
        path = GOLDEN / name
        assert path.is_file(), f"golden file {path} is missing: it is part of the repository"
        return path

    def json(self, name):
        return json.loads(self.path(name).read_text())

    def load(self, name):
        return torch.load(self.path(name))

    def model(self, name):
        ref = self.load(f"{name}.pt")
        ref["state_dict"] = {k: golden_param(k, tuple(s), ref["weight_seed"]) for k, s in ref["shapes"].items()}
        ref["inputs"] = {k: v.float() if v.is_floating_point() else v for k, v in ref["inputs"].items()}
        return ref


@pytest.fixture(scope="session")
def golden():
    return Golden()


class FileServer:
    """Serves one file; can ignore Range, or cut the body short, and records Range headers."""

    def __init__(self, payload):
        self.payload, self.ranges, self.ignore_range, self.cut_at = payload, [], False, None
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                header = self.headers.get("Range")
                server.ranges.append(header)
                start = int(header[len("bytes="):].rstrip("-")) if header and not server.ignore_range else 0
                body = server.payload[start:]
                if start >= len(server.payload) and header:
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{len(server.payload)}")
                    self.end_headers()
                    return
                self.send_response(206 if start else 200)
                if start:
                    self.send_header("Content-Range", f"bytes {start}-{len(server.payload) - 1}/{len(server.payload)}")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body if server.cut_at is None else body[: server.cut_at])

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/data.zip"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def file_server():
    """file_server(payload) -> a running FileServer; all are shut down after the test."""
    servers = []
    yield lambda payload: servers.append(FileServer(payload)) or servers[-1]
    for server in servers:
        server.close()
