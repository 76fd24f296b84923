"""nanopiti/download.py against a local HTTP server: resuming, verifying, and the weights."""

import hashlib
import io
import os
import zipfile

import numpy as np
import pytest
import torch

from nanopiti import build_model, load_model, toy_config
from nanopiti import download as dl
from nanopiti.download import DownloadError, archive_problem, download


def _zip_bytes(rng):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as z:
        z.writestr("a/b.bin", rng.integers(0, 255, 50_000, dtype=np.uint8).tobytes())
    return buf.getvalue()


def test_download_resumes_verifies_and_restarts(tmp_path, file_server):
    payload = _zip_bytes(np.random.default_rng(5))
    md5 = hashlib.md5(payload).hexdigest()
    server = file_server(payload)
    dest = str(tmp_path / "data.zip")
    # a previous run left 40% behind: only the rest is requested
    with open(dest + ".part", "wb") as f:
        f.write(payload[: len(payload) * 2 // 5])
    download(server.url, dest, md5, chunk_size=4096)
    assert server.ranges[-1] == f"bytes={len(payload) * 2 // 5}-"
    assert open(dest, "rb").read() == payload and not os.path.exists(dest + ".part")

    # the connection drops halfway: a clear error, the partial file stays, a rerun resumes
    os.remove(dest)
    server.cut_at = len(payload) // 2
    with pytest.raises(DownloadError, match="rerun"):
        download(server.url, dest, md5, chunk_size=4096)
    assert os.path.getsize(dest + ".part") == len(payload) // 2
    server.cut_at = None
    download(server.url, dest, md5, chunk_size=4096)
    assert server.ranges[-1] == f"bytes={len(payload) // 2}-" and open(dest, "rb").read() == payload

    # a server that ignores Range: start over, still correct
    os.remove(dest)
    with open(dest + ".part", "wb") as f:
        f.write(b"x" * 100)
    server.ignore_range = True
    download(server.url, dest, md5, chunk_size=4096)
    assert open(dest, "rb").read() == payload
    server.ignore_range = False

    # a complete partial file (server answers 416) is verified and kept
    os.remove(dest)
    with open(dest + ".part", "wb") as f:
        f.write(payload)
    download(server.url, dest, md5)
    assert open(dest, "rb").read() == payload

    # wrong md5 or a corrupt archive: refused, deleted
    os.remove(dest)
    with pytest.raises(DownloadError, match="md5"):
        download(server.url, dest, "0" * 32)
    assert not os.path.exists(dest + ".part") and not os.path.exists(dest)
    server.payload = payload[:-30] + b"\0" * 30  # damaged central directory
    with pytest.raises(DownloadError, match="failed verification .*BadZipFile"):
        download(server.url, dest, check=lambda path: archive_problem(path, dest))


def _checkpoint_bytes(config):
    buf = io.BytesIO()
    torch.save(build_model(config).state_dict(), buf)
    return buf.getvalue()


def _serve_as(monkeypatch, file_server, name, payload):
    """Point WEIGHTS[name] at a local server holding `payload`."""
    server = file_server(payload)
    url, filename, purpose, check = dl.WEIGHTS[name]
    monkeypatch.setitem(dl.WEIGHTS, name, (server.url, filename, purpose, check))
    return server


def test_fetch_weights_downloads_verifies_and_reuses(tmp_path, monkeypatch, file_server, capsys):
    payload = _checkpoint_bytes(toy_config("glide"))
    server = _serve_as(monkeypatch, file_server, "glide-base", payload)
    assert dl.main(["glide-base", "--out", str(tmp_path)]) == 0
    path = tmp_path / "base.pt"
    assert path.read_bytes() == payload and not os.path.exists(f"{path}.part")
    assert load_model(str(path)).config["kind"] == "glide"
    assert dl.main(["glide-base", "--out", str(tmp_path)]) == 0  # already there: no second request
    assert "already downloaded" in capsys.readouterr().out and len(server.ranges) == 1


@pytest.mark.parametrize("name,payload,why", [
    ("glide-base", "upsampler", "glide upsampler where GLIDE's base model"),     # the right kind of file, the wrong model
    ("glide-upsample", "zip", "not a"),                        # not a checkpoint at all
    ("vgg19", "base", "VGG19"),                                # a checkpoint of something else
    ("hed", "zip", "HED"),
])
def test_wrong_weights_are_refused_and_deleted(tmp_path, monkeypatch, file_server, capsys, name, payload, why):
    payloads = {"upsampler": lambda: _checkpoint_bytes(toy_config("glide", super_res=True)),
                "base": lambda: _checkpoint_bytes(toy_config("glide")),
                "zip": lambda: _zip_bytes(np.random.default_rng(0))}
    _serve_as(monkeypatch, file_server, name, payloads[payload]())
    assert dl.main([name, "--out", str(tmp_path)]) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after the progress bars
    assert err.startswith("error: ") and why in err and "deleted it" in err, err
    assert os.listdir(tmp_path) == []


def test_unknown_weights_name_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        dl.main(["glide-huge"])
    assert exit_info.value.code == 2 and "invalid choice" in capsys.readouterr().err
