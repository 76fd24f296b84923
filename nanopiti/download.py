"""Fetching what nanopiti does not ship: dataset archives (for `prepare_data.py --download`) and pretrained weights.

    python -m nanopiti.download glide-base glide-upsample vgg19 hed   # into checkpoints/

A download resumes where an interrupted one stopped (HTTP Range requests on `dest.part`) and is checked before it
is renamed into place: the announced size, the md5 where one is published, then its contents (an archive's CRCs;
weights must load as the model they claim to be). So `dest` either does not exist or holds a verified file.
"""

import argparse
import hashlib
import http.client
import os
import sys
import tarfile
import urllib.error
import urllib.request
import zipfile

from tqdm import tqdm

from .hed import HEDError, load_hed
from .model import ModelError, load_model
from .perceptual import PerceptualError, VGGPerceptual

class DownloadError(Exception):
    """A download that failed or a file that failed its check; printed as one line."""

def download(url, dest, md5=None, check=None, chunk_size=1 << 20, timeout=60):
    """Fetch `url` to `dest` with a progress bar, resuming `dest`.part by a Range request ("bytes=<size>-"; a
    server that ignores it, status 200, starts it over). `check(path)` returns None for a good file, or why not."""
    part = dest + ".part"
    start = os.path.getsize(part) if os.path.exists(part) else 0
    headers = {"User-Agent": "nanopiti-download"}
    if start:
        headers["Range"] = f"bytes={start}-"
    try:
        response = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code != 416 or not start:
            raise DownloadError(f"{url}: HTTP {e.code} {e.reason}") from None
        response = None  # 416: nothing left to send; is the partial file complete?
        total = int(e.headers.get("Content-Range", "*/-1").rsplit("/", 1)[-1])
    except (urllib.error.URLError, OSError) as e:
        raise DownloadError(f"cannot reach {url} ({getattr(e, 'reason', e)}); check the network and rerun") from None
    if response is not None:
        with response:
            if start and response.status != 206:
                start = 0
            length = response.headers.get("Content-Length")
            total = start + int(length) if length is not None else None
            with open(part, "ab" if start else "wb") as f, tqdm(
                    total=total, initial=start, unit="B", unit_scale=True, unit_divisor=1024,
                    desc=os.path.basename(dest)) as bar:
                while True:
                    try:
                        chunk = response.read(chunk_size)
                    except (OSError, http.client.HTTPException) as e:
                        raise DownloadError(f"download of {url} interrupted at {f.tell()} bytes "
                                            f"({type(e).__name__}); rerun the same command to resume") from None
                    if not chunk:
                        break
                    f.write(chunk)
                    bar.update(len(chunk))
    size = os.path.getsize(part)
    if total is not None and size != total:
        if size > total:
            os.remove(part)
        raise DownloadError(f"download of {url} stopped at {size} of {total} bytes; rerun the same command to resume")
    if problem := md5_problem(part, dest, md5) or (check(part) if check else None):
        os.remove(part)
        raise DownloadError(f"{os.path.basename(dest)} failed verification ({problem}); deleted it, rerun to "
                            "download again")
    os.replace(part, dest)

def md5_problem(path, name, md5):
    """None if the file's md5 is `md5` (or no md5 is known), else what it is instead."""
    if not md5:
        return None
    digest = hashlib.md5()
    with open(path, "rb") as f, tqdm(total=os.path.getsize(path), unit="B", unit_scale=True,
                                      desc="md5 " + os.path.basename(name)) as bar:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
            bar.update(len(block))
    return None if digest.hexdigest() == md5 else f"md5 {digest.hexdigest()} instead of {md5}"

def archive_problem(path, name):
    """None if the file at `path` (an archive called `name`) is intact, else why not."""
    try:
        if name.endswith(".zip"):
            with zipfile.ZipFile(path) as z:
                bad = z.testzip()  # reads every member and checks its CRC
            return f"member {bad} fails its CRC" if bad else None
        with tarfile.open(path, "r:*") as t:
            for _ in t:  # walks to the end of the gzip stream, which checks its CRC
                pass
    except (zipfile.BadZipFile, tarfile.TarError, EOFError, OSError) as e:
        return f"{type(e).__name__}: {e}"
    return None

def unpack(archive, target):
    """Extract a .zip or .tar(.gz) archive into `target`, with a progress bar."""
    if archive.endswith(".zip"):
        with zipfile.ZipFile(archive) as z:
            for member in tqdm(z.infolist(), desc="unzip " + os.path.basename(archive)):
                z.extract(member, target)
    else:
        with tarfile.open(archive, "r:*") as t:
            for member in tqdm(t, desc="untar " + os.path.basename(archive)):
                t.extract(member, target, filter="data")

def _loads(load, error, **kwargs):
    """check(path): None when load(path, **kwargs) succeeds, else the message of the `error` it raises."""
    def check(path):
        try:
            load(path, **kwargs)
        except error as e:
            return str(e)
        return None
    return check

def _load_glide(path, super_res):
    """Load `path`; a ModelError unless it is GLIDE's base model (super_res False) or upsampler (True)."""
    config = load_model(path).config
    role = {False: "base model", True: "upsampler"}
    if config["kind"] != "glide" or config["super_res"] != super_res:
        raise ModelError(f"a {config['kind']} {role[config['super_res']]} where GLIDE's {role[super_res]} "
                         "was expected")

# name -> (url, file name, what it is for, check)
WEIGHTS = {
    "glide-base": ("https://openaipublic.blob.core.windows.net/diffusion/dec-2021/base.pt", "base.pt",
                   "GLIDE's 64x64 text prior: train.py --stage 1 --init",
                   _loads(_load_glide, ModelError, super_res=False)),
    "glide-upsample": ("https://openaipublic.blob.core.windows.net/diffusion/dec-2021/upsample.pt", "upsample.pt",
                       "GLIDE's 64->256 upsampler: train.py --stage up --init",
                       _loads(_load_glide, ModelError, super_res=True)),
    "vgg19": ("https://download.pytorch.org/models/vgg19-dcbccd4d.pth", "vgg19-dcbccd4d.pth",
              "ImageNet VGG19 for the perceptual loss: train.py --stage up --vgg-weights",
              _loads(VGGPerceptual, PerceptualError)),
    "hed": ("http://content.sniklaus.com/github/pytorch-hed/network-bsds500.pytorch", "network-bsds500.pytorch",
            "HED edges for sketches: prepare_data.py --data coco-sketch --hed-weights", _loads(load_hed, HEDError)),
}

def main(argv=None):
    listing = "\n".join(f"  {name:<15} {entry[2]}" for name, entry in WEIGHTS.items())
    parser = argparse.ArgumentParser(description="Download pretrained weights, verified.", epilog=listing,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="+", choices=list(WEIGHTS), metavar="NAME",
                        help="one or more of: " + ", ".join(WEIGHTS))
    parser.add_argument("--out", default="checkpoints", help="folder to download into")
    args = parser.parse_args(argv)
    try:
        for name in args.names:
            url, filename, _, check = WEIGHTS[name]
            path = os.path.join(args.out, filename)
            if os.path.exists(path):
                print(f"{path}: already downloaded")
            else:
                os.makedirs(args.out, exist_ok=True)
                download(url, path, check=check)
            print(f"{name}: {path}")
    except DownloadError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0

if __name__ == "__main__":
    sys.exit(main())
