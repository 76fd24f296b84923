"""demo.py's HTTP API: a server on a free port, masks posted, PNGs back (equal to sample.py's), bad requests."""

import base64
import io
import json
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import pytest
import torch
from PIL import Image
from test_sample import save_checkpoint, toy_mask

import demo
import sample
from nanopiti.colormap import COCO_STUFF_CLASSES, NUM_COCO_CLASSES
from toyworld.world import HELDOUT_SEED0, TOY_COLORS, render_scene


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("demo")
    Image.fromarray(toy_mask(0)).save(d / "mask.png")
    return {"base": save_checkpoint(d / "base.pt", "piti", False, seed=1),
            "up": save_checkpoint(d / "up.pt", "piti", True, seed=2),
            "sketch_base": save_checkpoint(d / "sketch_base.pt", "piti", False, task="sketch", seed=3),
            "depth_base": save_checkpoint(d / "depth_base.pt", "piti", False, task="depth", seed=4),
            "mask": d / "mask.png"}


class Running:
    """demo.py's server on a free loopback port, serving from a thread of this process."""

    def __init__(self, *argv):
        self.server = demo.make_server(demo.parse_args(["--port", "0", "--device", "cpu", *argv]))
        self.demo = self.server.demo
        self.url = "http://127.0.0.1:%d" % self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def call(self, path, body=None):
        """GET (body None) or POST (bytes, or a dict sent as JSON) -> (HTTP status, JSON answer)."""
        data = json.dumps(body).encode() if isinstance(body, dict) else body
        try:
            with urllib.request.urlopen(urllib.request.Request(self.url + path, data), timeout=120) as r:
                return r.status, json.load(r)
        except urllib.error.HTTPError as e:
            return e.code, json.load(e)

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def mask_server(files):
    running = Running("--ckpt", files["base"], "--sr-ckpt", files["up"])
    yield running
    running.close()


def png(array, mode=None):
    buffer = io.BytesIO()
    Image.fromarray(array, mode).save(buffer, format="PNG")
    return buffer.getvalue()


def pictures(data_urls):
    return [np.asarray(Image.open(io.BytesIO(base64.b64decode(u.split(",", 1)[1])))) for u in data_urls]


def canvas_pixels(answer, size=128):
    return np.frombuffer(base64.b64decode(answer["pixels"]), np.uint8).reshape(size, size, 3)


def test_info_listens_on_loopback_and_names_the_classes(mask_server):
    assert mask_server.server.server_address[0] == "127.0.0.1"
    status, info = mask_server.call("/api/info")
    assert status == 200
    assert (info["task"], info["world"], info["canvas"], info["base_size"], info["sr_size"]) == ("mask", "toy", 128, 32, 64)
    assert [c["color"] for c in info["classes"]] == TOY_COLORS.tolist()
    assert info["classes"][8]["name"] == "house"
    assert len(COCO_STUFF_CLASSES) == NUM_COCO_CLASSES
    with urllib.request.urlopen(mask_server.url + "/") as r:
        assert b"<canvas" in r.read()


def test_generate_equals_sample_py_and_reports_progress(mask_server, files, tmp_path, capsys):
    settings = {"steps": 4, "num": 2, "seed": 3, "w": 1.5, "guidance": "cf"}
    request = {"condition": "data:image/png;base64," + base64.b64encode(files["mask"].read_bytes()).decode(),
               "job": "job-1", **settings}
    status, answer = mask_server.call("/api/generate", request)
    assert status == 200, answer
    assert answer["settings"] == settings
    base, up = pictures(answer["base"]), pictures(answer["upsampled"])
    assert [p.shape for p in base] == [(32, 32, 3)] * 2 and [p.shape for p in up] == [(64, 64, 3)] * 2
    assert not np.array_equal(up[0], up[1])  # two samples, not one twice
    # the same pictures as the command line, byte for byte: one pipeline
    cli = ["--ckpt", files["base"], "--sr-ckpt", files["up"], "--cond", str(files["mask"]), "--steps", "4",
           "--num", "2", "--seed", "3", "--w", "1.5", "--guidance", "cf", "--device", "cpu"]
    assert sample.main(cli + ["--out", str(tmp_path / "up")]) == 0
    assert sample.main(cli + ["--base-only", "--out", str(tmp_path / "base")]) == 0
    capsys.readouterr()
    for k in range(2):
        assert np.array_equal(up[k], np.asarray(Image.open(tmp_path / "up" / f"mask_{k}.png")))
        assert np.array_equal(base[k], np.asarray(Image.open(tmp_path / "base" / f"mask_{k}.png")))
    # the progress of the last sampling: the upsampler's 27 steps (fast27), all done
    assert mask_server.call("/api/progress") == (200, {"job": "job-1", "stage": "upsampler", "done": 27, "total": 27})


def test_generate_callback_counts_every_step(mask_server):
    calls = []
    cond = torch.zeros(1, 3, 128, 128)
    sample.generate(mask_server.demo.base, mask_server.demo.sr, cond, cond, steps="3", sr_steps="2",
                    progress=False, callback=lambda *a: calls.append(a))
    assert calls == [("base", 1, 3), ("base", 2, 3), ("base", 3, 3), ("upsampler", 1, 2), ("upsampler", 2, 2)]


def test_requests_wait_their_turn_and_progress_is_watched(mask_server, files):
    request = {"condition": base64.b64encode(files["mask"].read_bytes()).decode(), "steps": 12, "seed": 5}
    answers, seen = {}, []
    threads = [threading.Thread(target=lambda j: answers.update({j: mask_server.call("/api/generate", {**request, "job": j})}),
                                args=(j,)) for j in ("a", "b")]
    for t in threads:
        t.start()
    while any(t.is_alive() for t in threads):
        seen.append(mask_server.call("/api/progress")[1])
        time.sleep(0.02)
    for t in threads:
        t.join()
    assert answers["a"][0] == answers["b"][0] == 200
    assert answers["a"][1]["upsampled"] == answers["b"][1]["upsampled"]  # one after the other: same seed, same picture
    running = [p for p in seen if p["job"] in ("a", "b")]
    turns = [p["job"] for k, p in enumerate(running) if k == 0 or running[k - 1]["job"] != p["job"]]
    assert sorted(turns) == ["a", "b"], turns  # one ran, then the other: never interleaved
    assert {p["job"] for p in running} == {"a", "b"}
    assert all(p["stage"] in ("base", "upsampler") and 0 <= p["done"] <= p["total"] for p in running)
    assert any(0 < p["done"] < p["total"] for p in running)  # seen in the middle of a run


def test_toy_scene_and_upload(mask_server):
    status, scene = mask_server.call("/api/toy-scene?index=7")
    assert status == 200
    held_out = render_scene(HELDOUT_SEED0 + 7, 128)
    assert np.array_equal(canvas_pixels(scene), TOY_COLORS[held_out.label])
    assert scene["caption"] == held_out.caption
    # a class-index map of another size is colored with the toy palette and resized with nearest neighbour
    labels = np.random.RandomState(0).randint(0, 10, (40, 50)).astype(np.uint8)
    status, answer = mask_server.call("/api/condition", png(labels))
    assert status == 200, answer
    expected = TOY_COLORS[np.asarray(Image.fromarray(labels).resize((128, 128), Image.NEAREST))]
    assert np.array_equal(canvas_pixels(answer), expected)


def huge_but_small_png():
    buffer = io.BytesIO()
    Image.new("1", (5000, 5000)).save(buffer, format="PNG")
    return buffer.getvalue()


BAD = [
    ("/api/condition", b"this is not a picture", "cannot be read"),
    ("/api/condition", png(toy_mask(0))[:200], "cannot be read"),  # truncated
    ("/api/condition", huge_but_small_png(), "too many pixels"),
    ("/api/condition", b"\0" * (demo.MAX_BODY + 1), "at most 10 MB"),
    ("/api/condition", png(np.zeros((64, 64, 3), np.uint8)), "the canvas is empty"),
    ("/api/condition", png(np.full((64, 64, 3), (1, 2, 3), np.uint8)), "outside the toy palette"),
    ("/api/condition", png(np.full((64, 64), 12, np.uint8)), "outside the palette's 0..9"),
    ("/api/condition", png(np.zeros((8, 8, 2), np.uint8), "LA"), "mode LA"),
    ("/api/generate", b"{not json", "not JSON"),
    ("/api/generate", b"[1, 2]", "JSON object"),
    ("/api/generate", {"steps": 4}, "no condition picture"),
    ("/api/generate", {"condition": "%%%"}, "not valid base64"),
    ("/api/generate", {"condition": base64.b64encode(b"junk").decode()}, "cannot be read"),
    ("/api/generate", {"condition": "x", "steps": 1001}, "steps must be a whole number from 1 to 1000"),
    ("/api/generate", {"condition": "x", "steps": 2.5}, "steps must be"),
    ("/api/generate", {"condition": "x", "num": 0}, "num must be"),
    ("/api/generate", {"condition": "x", "seed": -1}, "seed must be"),
    ("/api/generate", {"condition": "x", "seed": True}, "seed must be"),
    ("/api/generate", {"condition": "x", "w": "lots"}, "guidance strength w must be a number from 0 to 20"),
    ("/api/generate", {"condition": "x", "w": 21}, "guidance strength w must be"),
    ("/api/generate", {"condition": "x", "guidance": "strong"}, "guidance must be one of ncf, cf, none"),
    ("/api/toy-scene?index=-3", None, "index must be a whole number"),
    ("/api/toy-scene?index=1000000", None, "index must be a whole number"),
]


@pytest.mark.parametrize("path, body, message", BAD, ids=[f"{p} {m}" for p, _, m in BAD])
def test_bad_requests_get_one_clear_line(mask_server, files, path, body, message):
    status, answer = mask_server.call(path, body)
    assert status == 400 and message in answer["error"] and "\n" not in answer["error"], answer


def test_unknown_paths_and_the_server_keeps_serving(mask_server, files):
    assert mask_server.call("/nothing")[0] == 404
    assert mask_server.call("/api/nothing", b"")[0] == 404
    request = {"condition": base64.b64encode(files["mask"].read_bytes()).decode(), "steps": 2}
    assert mask_server.call("/api/generate", request)[0] == 200


def test_sketch_model_page_and_conditions(files):
    running = Running("--ckpt", files["sketch_base"], "--base-only")
    try:
        status, info = running.call("/api/info")
        assert (info["task"], info["classes"], info["sr_size"]) == ("sketch", None, None)
        lines = np.full((64, 64), 255, np.uint8)
        lines[20, 5:60] = 0  # a black line on white: turned into PITI's white lines on black
        status, answer = running.call("/api/condition", png(lines))
        assert status == 200
        expected = np.asarray(Image.fromarray(255 - lines).resize((128, 128), Image.NEAREST))
        assert np.array_equal(canvas_pixels(answer)[..., 0], expected)
        assert "the sketch is empty" in running.call("/api/condition", png(np.zeros((64, 64), np.uint8)))[1]["error"]
        status, answer = running.call("/api/generate", {"condition": base64.b64encode(png(lines)).decode(), "steps": 2})
        assert status == 200 and [p.shape for p in pictures(answer["base"])] == [(32, 32, 3)]
        assert answer["upsampled"] == []
    finally:
        running.close()


def test_startup_errors_one_line(files, capsys, mask_server):
    port = str(mask_server.server.server_address[1])
    for argv, message in ((["--ckpt", files["depth_base"], "--base-only"], "use sample.py"),
                          (["--ckpt", files["up"], "--base-only"], "needs a PITI base model"),
                          (["--ckpt", files["base"], "--sr-ckpt", files["up"], "--port", port], "pick another --port"),
                          (["--threads", "0"], "--threads must be at least 1")):
        assert demo.main(argv + ["--device", "cpu"]) == 1
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and err.count("\n") == 1, err
