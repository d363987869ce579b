"""Download Oxford5k / Paris6k (original and revisited ground truth) into the layouts the loaders read.

    python -m trainables.data.download oxford5k paris6k --dest DATA_ROOT

writes `DATA_ROOT/<name>/jpg/*.jpg` plus `gt/*.txt` (original) or `gnd_<name>.pkl` (revisited), then checks the
result loads. Archives are kept in `DATA_ROOT/.downloads/` (delete them once the data is laid out; an interrupted
transfer resumes from its `.part` file with an HTTP Range request). roxford5k / rparis6k link to the images of
oxford5k / paris6k when those are already laid out next to them, instead of copying 2 GB. URLs and sha256 checksums are
configurable (`--url FILE=URL`, `--sha256 FILE=HEX`); a checksum mismatch names the file, the expected and the
actual digest.

Default URLs are the public ones (VGG Oxford for images and original gt, CMP Prague for the revisited gnd
files, as in cnnimageretrieval-pytorch and revisitop). No default checksums are pinned: this code was written
without access to those servers, so a pin could not be checked. When a file has no checksum the downloader
prints the sha256 it computed so it can be pinned with `--sha256` (or `checksums=`) on the next machine.
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import logging
import shutil
import sys
import tarfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from trainables.data.oxford import DatasetError, load_original, load_revisited

log = logging.getLogger(__name__)

_OXFORD = "https://www.robots.ox.ac.uk/~vgg/data/oxbuildings"
_PARIS = "https://www.robots.ox.ac.uk/~vgg/data/parisbuildings"
_REVISITOP = "https://cmp.felk.cvut.cz/revisitop/data/datasets"
_CHUNK = 1 << 20
_USER_AGENT = "vladsweep-downloader/0.1 (research benchmark download)"


@dataclass(frozen=True)
class Archive:
    filename: str
    kind: str  # "images": *.jpg -> jpg/ ; "gt": *.txt -> gt/ ; "gnd": the file itself -> <root>/<filename>


DATASET_FILES: dict[str, list[Archive]] = {
    "oxford5k": [Archive("oxbuild_images-v1.tgz", "images"), Archive("gt_files_170407.tgz", "gt")],
    "paris6k": [
        Archive("paris_1-v1.tgz", "images"),
        Archive("paris_2-v1.tgz", "images"),
        Archive("paris_120310.tgz", "gt"),
    ],
    "roxford5k": [Archive("oxbuild_images-v1.tgz", "images"), Archive("gnd_roxford5k.pkl", "gnd")],
    "rparis6k": [
        Archive("paris_1-v1.tgz", "images"),
        Archive("paris_2-v1.tgz", "images"),
        Archive("gnd_rparis6k.pkl", "gnd"),
    ],
}

DEFAULT_URLS: dict[str, str] = {
    "oxbuild_images-v1.tgz": f"{_OXFORD}/oxbuild_images-v1.tgz",
    "gt_files_170407.tgz": f"{_OXFORD}/gt_files_170407.tgz",
    "paris_1-v1.tgz": f"{_PARIS}/paris_1-v1.tgz",
    "paris_2-v1.tgz": f"{_PARIS}/paris_2-v1.tgz",
    "paris_120310.tgz": f"{_PARIS}/paris_120310.tgz",
    "gnd_roxford5k.pkl": f"{_REVISITOP}/roxford5k/gnd_roxford5k.pkl",
    "gnd_rparis6k.pkl": f"{_REVISITOP}/rparis6k/gnd_rparis6k.pkl",
}

# filename -> sha256 hex. Deliberately empty: see the module docstring. Pass `checksums=` / `--sha256` to pin.
DEFAULT_CHECKSUMS: dict[str, str] = {}


class DownloadError(RuntimeError):
    """A transfer failed or was cut short; the partial file is kept so the next run resumes it."""


class ChecksumError(DownloadError):
    """A downloaded file's sha256 differs from the expected one."""

    def __init__(self, path: Path, expected: str, got: str):
        self.path, self.expected, self.got = path, expected, got
        super().__init__(
            f"checksum mismatch for {path.name}: expected sha256 {expected}, got {got}. "
            f"The file was removed; check the URL (or the pinned checksum) and run again."
        )


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(_CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def _total_from_headers(resp: http.client.HTTPResponse, offset: int) -> int | None:
    content_range = resp.headers.get("Content-Range")  # "bytes 100-999/1000"
    if content_range and "/" in content_range:
        total = content_range.rsplit("/", 1)[1].strip()
        return int(total) if total.isdigit() else None
    length = resp.headers.get("Content-Length")
    return offset + int(length) if length and length.isdigit() else None


def fetch(
    url: str, dest: Path, sha256: str | None = None, progress: bool = True, timeout: float = 60.0
) -> Path:
    """Download `url` to `dest`, resuming `dest.part` with an HTTP Range request; verify sha256 when given.

    An existing `dest` is reused when it matches the checksum (or when no checksum is given).
    """
    dest = Path(dest)
    if dest.is_file():
        if sha256 is None or sha256_file(dest) == sha256.lower():
            return dest
        log.warning("%s does not match its checksum; downloading it again", dest)
        dest.unlink()
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    offset = part.stat().st_size if part.exists() else 0

    headers = {"User-Agent": _USER_AGENT}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    request = urllib.request.Request(url, headers=headers)
    try:
        resp = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and offset:  # range past the end: the .part already holds the whole file
            resp = None
        else:
            raise DownloadError(
                f"cannot download {dest.name} from {url}: HTTP {exc.code} {exc.reason}"
            ) from exc
    except (urllib.error.URLError, OSError) as exc:
        raise DownloadError(f"cannot download {dest.name} from {url}: {exc}") from exc

    if resp is not None:
        with resp:
            if offset and resp.status != 206:  # server ignored the Range: start over
                log.info("%s: server does not support resume, restarting the download", url)
                offset = 0
            total = _total_from_headers(resp, offset)
            mode = "ab" if offset else "wb"
            done = offset
            bar = tqdm(
                total=total, initial=offset, unit="B", unit_scale=True, desc=dest.name, disable=not progress
            )
            try:
                with open(part, mode) as fh:
                    while True:
                        block = resp.read(_CHUNK)
                        if not block:
                            break
                        fh.write(block)
                        done += len(block)
                        bar.update(len(block))
            except (OSError, http.client.HTTPException) as exc:
                raise DownloadError(
                    f"download of {dest.name} from {url} interrupted after {done} of {total or '?'} bytes "
                    f"({type(exc).__name__}); run again to resume from {part}"
                ) from exc
            finally:
                bar.close()
            if total is not None and done != total:
                raise DownloadError(
                    f"download of {dest.name} from {url} stopped at {done} of {total} bytes; "
                    f"run again to resume from {part}"
                )

    got = sha256_file(part)
    if sha256 is not None and got != sha256.lower():
        part.unlink()
        raise ChecksumError(dest, sha256.lower(), got)
    if sha256 is None:
        print(f"{dest.name}: sha256 {got} (no checksum pinned; pass --sha256 {dest.name}={got} to pin it)")
    part.replace(dest)
    return dest


def _extract(archive: Path, kind: str, root: Path) -> int:
    """Flatten the archive's *.jpg (kind images) or *.txt (kind gt) into root/jpg or root/gt; returns count.

    Only regular files are written and only under their base name, so paths in the archive ('..', absolute,
    links) cannot escape the target folder.
    """
    suffix, sub = {"images": (".jpg", "jpg"), "gt": (".txt", "gt")}[kind]
    out = root / sub
    out.mkdir(parents=True, exist_ok=True)
    n = 0
    try:
        with tarfile.open(archive, "r:*") as tar:
            for member in tar:
                name = Path(member.name).name
                if not member.isfile() or not name.lower().endswith(suffix) or name.startswith("."):
                    continue
                src = tar.extractfile(member)
                if src is None:
                    continue
                with src, open(out / name, "wb") as fh:
                    shutil.copyfileobj(src, fh)
                n += 1
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise DownloadError(f"cannot extract {archive}: {exc}; delete it and run again") from exc
    if n == 0:
        raise DownloadError(f"{archive} holds no *{suffix} files; is it the right archive for {kind}?")
    return n


def download_dataset(
    name: str,
    dest: str | Path,
    urls: dict[str, str] | None = None,
    checksums: dict[str, str] | None = None,
    progress: bool = True,
) -> Path:
    """Download and lay out dataset `name` under `<dest>/<name>`; returns that folder after it loads cleanly.

    `urls` / `checksums` map an archive's file name (see `DATASET_FILES`) to a URL / sha256, overriding the
    defaults. Raises `DownloadError` (or its `ChecksumError`) naming the file that failed.
    """
    if name not in DATASET_FILES:
        raise ValueError(f"unknown dataset {name!r}; downloadable: {', '.join(DATASET_FILES)}")
    urls = {**DEFAULT_URLS, **(urls or {})}
    checksums = {**DEFAULT_CHECKSUMS, **(checksums or {})}
    dest = Path(dest)
    root, cache = dest / name, dest / ".downloads"
    root.mkdir(parents=True, exist_ok=True)
    files = DATASET_FILES[name]
    revisited = any(a.kind == "gnd" for a in files)
    images = [a.filename for a in files if a.kind == "images"]
    sibling = dest / name[1:]  # roxford5k -> oxford5k: same photos, so share its jpg/ instead of a 2 GB copy
    if (
        revisited
        and not (root / "jpg").exists()
        and all((sibling / f".extracted-{f}").exists() for f in images)
    ):
        (root / "jpg").symlink_to(Path("..") / sibling.name / "jpg", target_is_directory=True)
        for f in images:
            (root / f".extracted-{f}").write_text(f"shared with {sibling.name}\n")
    for archive in files:
        marker = root / f".extracted-{archive.filename}"
        if archive.kind != "gnd" and marker.exists():
            continue  # already laid out: no need to fetch (or even keep) the archive
        path = fetch(
            urls[archive.filename], cache / archive.filename, checksums.get(archive.filename), progress
        )
        if archive.kind == "gnd":
            shutil.copyfile(path, root / archive.filename)
        else:
            n = _extract(path, archive.kind, root)
            marker.write_text(f"{n}\n")

    dataset = load_revisited(root, name) if revisited else load_original(root, name)
    print(dataset.summary())
    return root


def _pairs(values: list[str], what: str) -> dict[str, str]:
    out = {}
    for v in values:
        key, sep, val = v.partition("=")
        if not sep or not key or not val:
            raise SystemExit(
                f"--{what} expects FILE={what.upper()}, e.g. oxbuild_images-v1.tgz=..., got {v!r}"
            )
        out[key] = val
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m trainables.data.download",
        description="Download Oxford5k/Paris6k (original or revisited ground truth) into DEST/<name>.",
    )
    parser.add_argument("names", nargs="+", choices=sorted(DATASET_FILES), metavar="NAME",
                        help=f"one or more of: {', '.join(DATASET_FILES)}")  # fmt: skip
    parser.add_argument("--dest", type=Path, required=True, help="data root; each dataset goes to DEST/NAME")
    parser.add_argument("--url", action="append", default=[], help="FILE=URL: fetch FILE from URL instead")
    parser.add_argument("--sha256", action="append", default=[], help="FILE=HEX: expected sha256 of FILE")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    urls, sums = _pairs(args.url, "url"), _pairs(args.sha256, "sha256")
    try:
        for name in args.names:
            download_dataset(name, args.dest, urls=urls, checksums=sums, progress=not args.no_progress)
    except (DownloadError, DatasetError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
