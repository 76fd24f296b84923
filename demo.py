"""Paint a mask, get a picture: a local web page for PITI models (GauGAN-style).

    python demo.py                                      # the shipped toy models, http://127.0.0.1:8000/
    python demo.py --ckpt base_mask.pt --sr-ckpt upsample_mask.pt --device cuda   # released COCO-Stuff models

The page (demo.html) paints a label map in the model's palette, or a sketch (white lines on black); the server
samples it with sample.generate, as sample.py does: the same condition, settings and seed give the pictures of
`python sample.py --cond canvas.png --steps STEPS --w W --guidance GUIDANCE --num N --seed SEED`.
The server (http.server, loopback only unless --host) runs a thread per request but one sampling at a time.

API (JSON answers; a bad request gets HTTP 400 and {"error": "one line: what is wrong, what to do"}):
    GET  /                      the page
    GET  /api/info              task, canvas size, class palette, defaults and limits
    GET  /api/toy-scene?index=N held-out toy scene N as canvas pixels (toy models)
    POST /api/condition         body: a picture file -> its canvas pixels (an upload, checked)
    POST /api/generate          body: {"condition": PNG (base64 or data URL), "w", "guidance", "steps",
                                "seed", "num", "job"} -> {"base": [PNG data URLs], "upsampled": [...], "seconds"}
    GET  /api/progress          {"job", "stage", "done", "total"} of the sampling under way
"""

import argparse
import base64
import binascii
import contextlib
import http.server
import io
import json
import sys
import threading
import time
import traceback
import urllib.parse
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import sample
from nanopiti import ModelError, toy_config
from nanopiti.colormap import COCO_STUFF_CLASSES, PALETTES, in_palette
from nanopiti.conditions import binarize_sketch
from nanopiti.data import DataError, label_image_to_color, load_condition_image
from nanopiti.guidance import GUIDANCES
from nanopiti.pictures import to_uint8
from toyworld.world import HELDOUT_SEED0, TOY_CLASSES, TOY_COLORS, render_scene

PAGE = Path(__file__).resolve().parent / "demo.html"
PALETTE_TABLES = {"toy": TOY_COLORS, **PALETTES}  # class value -> color, per world
CLASS_NAMES = {"toy": TOY_CLASSES, "coco": COCO_STUFF_CLASSES}  # ADE20K's classes are shown by number
# The page's defaults: 25 DDPM base steps (the toy ablations'); the upsampler as sample.py samples it (fast27).
DEFAULTS = {"w": sample.DEFAULT_W, "guidance": "ncf", "steps": 25, "seed": 0, "num": 1}
MAX_STEPS = 1000  # every GLIDE and PITI model was trained over 1000 steps (nanopiti.diffusion.model_diffusion)
MAX_NUM, MAX_W, MAX_SEED = 8, 20.0, 2**31 - 1
MAX_BODY = 10 * 2**20  # bytes in one request (an upload, or a condition in base64)
MAX_PIXELS = 4096 * 4096  # an upload larger than this is refused before it is decoded
HELDOUT_SCENES = 10**6  # the page's random button picks index 0..HELDOUT_SCENES-1: layout seed HELDOUT_SEED0 + index

class DemoError(ValueError):
    """Bad input from the page: the message is shown there as it is."""

def _int(body, name, low, high):
    value = body.get(name, DEFAULTS[name])
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise DemoError(f"{name} must be a whole number from {low} to {high}, got {value!r}")
    return value

def read_settings(body):
    """The sampling settings of a generate request, checked: DemoError says which one is wrong."""
    w = body.get("w", DEFAULTS["w"])
    if isinstance(w, bool) or not isinstance(w, (int, float)) or not 0 <= w <= MAX_W:
        raise DemoError(f"guidance strength w must be a number from 0 to {MAX_W:g}, got {w!r}")
    guidance = body.get("guidance", DEFAULTS["guidance"])
    if guidance not in GUIDANCES:
        raise DemoError(f"guidance must be one of {', '.join(GUIDANCES)}, got {guidance!r}")
    return {"w": float(w), "guidance": guidance, "steps": _int(body, "steps", 1, MAX_STEPS),
            "seed": _int(body, "seed", 0, MAX_SEED), "num": _int(body, "num", 1, MAX_NUM)}

def pixels(picture):
    """size x size x 3 uint8 -> its bytes in base64: how the page receives a canvas, exactly."""
    return base64.b64encode(picture.tobytes()).decode("ascii")

def png_data_url(picture):
    """H x W x C uint8 -> "data:image/png;base64,...", which an <img> shows and a link downloads."""
    buffer = io.BytesIO()
    Image.fromarray(picture).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")

class Demo:
    """The loaded models and what the request threads share: the sampling lock and its progress."""

    def __init__(self, base, sr, world, device, dtype):
        self.base, self.sr, self.world, self.device, self.dtype = base, sr, world, device, dtype
        self.task = base.config["task"]
        self.size = base.config["cond_size"]  # the canvas: the base model's condition size
        self.lock = threading.Lock()  # one sampling at a time
        self.progress = {"job": None, "stage": None, "done": 0, "total": 0}  # replaced whole, never edited

    def info(self):
        table = PALETTE_TABLES[self.world]
        names = CLASS_NAMES.get(self.world) or [f"class {v}" for v in range(len(table))]
        classes = [{"name": name, "color": [int(c) for c in color]} for name, color in zip(names, table)]
        return {"task": self.task, "world": self.world, "canvas": self.size, "device": str(self.device),
                "base_size": self.base.config["image_size"],
                "sr_size": self.sr.config["image_size"] if self.sr else None,
                "classes": classes if self.task == "mask" else None,
                "toy_scenes": HELDOUT_SCENES if self.world == "toy" else 0,
                "defaults": DEFAULTS, "guidances": GUIDANCES, "max_body": MAX_BODY,
                "limits": {"steps": MAX_STEPS, "num": MAX_NUM, "w": MAX_W, "seed": MAX_SEED}}

    def canvas(self, data):
        """Picture file bytes -> the canvas, size x size x 3 uint8 (nearest neighbour): label colors or white lines."""
        try:
            img = Image.open(io.BytesIO(data))  # reads the header only: the size is known before decoding
            too_big = img.width * img.height > MAX_PIXELS
            if not too_big:
                img.load()
        except Image.DecompressionBombError:  # PIL's own limit, above ours
            too_big = True
        except Exception as e:  # not a picture, truncated, ...
            raise DemoError(f"the picture cannot be read ({type(e).__name__}); "
                            "upload a PNG, JPEG, BMP or WebP file") from None
        if too_big:
            raise DemoError(f"the picture has too many pixels; at most {MAX_PIXELS} (e.g. 4096 x 4096) are accepted")
        img = img.resize((self.size, self.size), Image.NEAREST)
        if self.task == "sketch":
            lines = binarize_sketch(img.convert("L"))  # either polarity, as sample.py reads sketches
            if not lines.any():
                raise DemoError("the sketch is empty: draw some white lines first")
            return np.repeat((lines * 255).astype(np.uint8)[..., None], 3, axis=2)
        table = PALETTE_TABLES[self.world]
        try:  # RGB as is; class indices (single channel, or a palette PNG of other colors) colored
            color = label_image_to_color(img, table)
        except DataError as e:
            raise DemoError(str(e)) from None
        off = ~in_palette(color, table)
        if off.any():
            example = tuple(int(c) for c in color[off][0])
            raise DemoError(f"{off.mean():.1%} of the pixels have colors outside the {self.world} palette "
                            f"(e.g. {example}); paint with the palette, or save the map without smoothing")
        if not color.any():
            raise DemoError("the canvas is empty: paint a mask first" +
                            (" (or load a random toy scene)" if self.world == "toy" else ""))
        return color

    def toy_scene(self, query):
        """Held-out toy scene `index` (layout seed HELDOUT_SEED0 + index, never trained on)."""
        index = query.get("index", ["0"])[0]
        if not index.isdigit() or int(index) >= HELDOUT_SCENES:
            raise DemoError(f"index must be a whole number from 0 to {HELDOUT_SCENES - 1}, got {index!r}")
        if self.world != "toy":
            raise DemoError(f"toy scenes are for toy models; these models are of the {self.world} world")
        scene = render_scene(HELDOUT_SEED0 + int(index), self.size)
        picture = TOY_COLORS[scene.label] if self.task == "mask" else np.repeat(scene.sketch[..., None], 3, axis=2)
        return {"pixels": pixels(picture), "index": int(index), "caption": scene.caption}

    def generate(self, body):
        settings = read_settings(body)
        condition = body.get("condition")
        if not isinstance(condition, str) or not condition:
            raise DemoError("the request has no condition picture (a PNG in base64)")
        try:
            data = base64.b64decode(condition.split(",", 1)[-1], validate=True)
        except (binascii.Error, ValueError):
            raise DemoError("the condition is not valid base64") from None
        png = io.BytesIO()
        Image.fromarray(self.canvas(data)).save(png, format="PNG")
        sr_size = (self.sr or self.base).config["cond_size"]
        conds = {s: load_condition_image(io.BytesIO(png.getvalue()), self.task, size=s) for s in {self.size, sr_size}}
        job = str(body.get("job", ""))[:64]
        def report(stage, done, total):
            self.progress = {"job": job, "stage": stage, "done": done, "total": total}
        with self.lock:  # the other requests wait here for their turn
            report("base", 0, settings["steps"])
            n = settings["num"]  # as sample.py --num n: one batch of n copies of the condition, one generator
            cond = torch.stack([conds[self.size]] * n).to(self.device)
            sr_cond = torch.stack([conds[sr_size]] * n).to(self.device) if self.sr else None
            generator = torch.Generator(self.device).manual_seed(settings["seed"])
            start = time.time()
            with torch.inference_mode():
                low, high = sample.generate(
                    self.base, self.sr, cond, sr_cond, w=settings["w"], guidance=settings["guidance"],
                    steps=str(settings["steps"]), generator=generator, dtype=self.dtype,
                    cuda_graph=self.device.type == "cuda", progress=False, callback=report)
            seconds = time.time() - start
        return {"base": [png_data_url(p) for p in to_uint8(low)],
                "upsampled": [png_data_url(p) for p in to_uint8(high)] if high is not None else [],
                "seconds": round(seconds, 3), "settings": settings}

class Handler(http.server.BaseHTTPRequestHandler):
    """One request: the page, or the API on the Demo that the server carries (`server.demo`)."""

    timeout = 60  # a client that stops sending in the middle of a request is dropped

    def log_message(self, fmt, *args):  # one line per request on stderr, without the progress polls
        if not self.path.startswith("/api/progress"):
            sys.stderr.write(f"{self.address_string()} {fmt % args}\n")

    def send(self, code, payload, content_type="application/json"):
        body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def answer(self, work):
        """Send `work()`'s JSON, or the error's one line: 400 for bad input, 500 for a bug."""
        try:
            code, payload = 200, work()
        except DemoError as e:
            code, payload = 400, {"error": str(e)}
        except Exception as e:  # a bug: say so on the page, print the traceback here, keep serving
            traceback.print_exc()
            code, payload = 500, {"error": f"internal error ({type(e).__name__}: {e}); see the server's console"}
        self.send(code, payload)

    def read_body(self):
        length = self.headers.get("Content-Length", "")
        if not length.isdigit():
            raise DemoError("the request has no Content-Length")
        length = int(length)
        if length > MAX_BODY:
            left = length  # read it all: else the browser may see a reset connection, not the answer
            while left > 0 and (chunk := self.rfile.read(min(2**20, left))):
                left -= len(chunk)
            raise DemoError(f"the upload is {length / 2**20:.1f} MB; at most {MAX_BODY / 2**20:.0f} MB are accepted")
        return self.rfile.read(length)

    def do_GET(self):
        url = urllib.parse.urlsplit(self.path)
        if url.path in ("/", "/index.html"):
            self.send(200, PAGE.read_bytes(), "text/html; charset=utf-8")
        elif url.path == "/api/info":
            self.answer(self.server.demo.info)
        elif url.path == "/api/progress":
            self.answer(lambda: self.server.demo.progress)
        elif url.path == "/api/toy-scene":
            self.answer(lambda: self.server.demo.toy_scene(urllib.parse.parse_qs(url.query)))
        else:
            self.send(404, {"error": f"no such page: {url.path}"})

    def do_POST(self):
        if self.path == "/api/condition":
            self.answer(lambda: {"pixels": pixels(self.server.demo.canvas(self.read_body()))})
        elif self.path == "/api/generate":
            self.answer(lambda: self.server.demo.generate(self.json_body()))
        else:
            self.send(404, {"error": f"no such endpoint: {self.path}"})

    def json_body(self):
        try:
            body = json.loads(self.read_body())
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise DemoError("the request body is not JSON") from None
        if not isinstance(body, dict):
            raise DemoError("the request body must be a JSON object")
        return body

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--ckpt", default=str(sample.DEFAULT_CKPT), help="PITI base model (mask or sketch)")
    p.add_argument("--sr-ckpt", default=str(sample.DEFAULT_SR_CKPT), help="PITI upsampler")
    p.add_argument("--base-only", action="store_true", help="no upsampler: show the base model's pictures only")
    p.add_argument("--world", choices=sorted(PALETTE_TABLES), help="classes (default: toy for toy models, else coco)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every network)")
    p.add_argument("--port", type=int, default=8000, help="0: any free port")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cuda, cuda:1, cpu")
    p.add_argument("--dtype", choices=sorted(sample.DTYPES), help="autocast dtype on GPU (default bf16)")
    p.add_argument("--threads", type=int, default=1, help="CPU threads (for the toy models one is as fast as two)")
    return p.parse_args(argv)

def make_server(args):
    """Bind the server (not yet serving), then load and check the models. Raises SampleError/ModelError."""
    if args.threads < 1:
        raise sample.SampleError("--threads must be at least 1")
    if not 0 <= args.port <= 65535:
        raise sample.SampleError(f"--port {args.port}: a port is 0..65535 (0: any free port)")
    device, dtype = sample.resolve_device(args.device, args.dtype)
    try:  # first, so that a port in use is said before the models load
        server = http.server.ThreadingHTTPServer((args.host, args.port), Handler)
    except OSError as e:
        raise sample.SampleError(f"cannot listen on {args.host}:{args.port} ({e.strerror}); "
                                 "pick another --port (0: any free one)") from None
    server.daemon_threads = True  # Ctrl+C does not wait for open connections
    try:
        base = sample.load_piti(args.ckpt, upsampler=False)
        sr = None if args.base_only else sample.load_piti(args.sr_ckpt, upsampler=True)
        task = sample.check_pair(base, sr, None)
        if task == "depth":
            raise sample.SampleError("the page paints masks and sketches; a depth model needs a normal and a "
                                     "depth picture: use sample.py --cond normal.png,depth.png")
    except Exception:
        server.server_close()
        raise
    world = args.world or ("toy" if base.config["image_size"] == toy_config()["image_size"] else "coco")
    torch.set_num_threads(args.threads)
    server.demo = Demo(base.to(device), sr.to(device) if sr else None, world, device, dtype)
    return server

def main(argv=None):
    args = parse_args(argv)
    try:
        server = make_server(args)
    except (sample.SampleError, ModelError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    host, port = server.server_address[:2]
    demo = server.demo
    models = f"{demo.world} {demo.task} models" + ("" if demo.sr else " (base only)")
    print(f"nanopiti demo: http://{host}:{port}/  ({models} on {demo.device}; Ctrl+C stops it)", flush=True)
    with server, contextlib.suppress(KeyboardInterrupt):
        server.serve_forever()
    return 0

if __name__ == "__main__":
    sys.exit(main())
