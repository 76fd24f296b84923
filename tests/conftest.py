"""Test session setup shared by every test file.

The tests' tensors are small: one intra-op thread computes them as fast as two, and on a busy
machine OpenMP threads that wait on each other make small convolutions tens of times slower.

Without a GPU, the Triton kernels run in Triton's numpy interpreter. TRITON_INTERPRET is read when
`triton.jit` decorates a kernel, i.e. when `kernels` is first imported, so it is set here, before
any test module is collected. With a GPU it stays unset and the same tests run natively.

`file_server` serves bytes over HTTP on localhost, for the downloader's tests (tests never reach
the internet).
"""

import http.server
import os
import threading

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

torch.set_num_threads(1)


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
