"""The dataset downloader against a real local HTTP server (127.0.0.1, a thread) standing in for the public
archive hosts — the only stand-in here is the outside world: the archives are tiny ones this test builds."""

from __future__ import annotations

import hashlib
import io
import pickle
import tarfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from PIL import Image

from trainables.data.download import ChecksumError, DownloadError, download_dataset, fetch, main
from trainables.data.registry import load_dataset

TINY_IMAGES = [f"tower_{i:06d}" for i in range(1, 6)] + [f"misc_{i:06d}" for i in range(1, 8)]


def make_oxford(root: Path) -> Path:
    """A 12-image Oxford-layout folder with 4 queries (2 landmarks)."""
    (root / "jpg").mkdir(parents=True)
    (root / "gt").mkdir()
    for i, name in enumerate(TINY_IMAGES):
        Image.new("RGB", (40, 30), (20 * i, 100, 200 - 10 * i)).save(root / "jpg" / f"{name}.jpg")
    for q, (image, good) in {
        "tower_1": ("tower_000001", ["tower_000001", "tower_000002"]),
        "tower_2": ("tower_000003", ["tower_000003", "tower_000004"]),
        "misc_1": ("misc_000001", ["misc_000001", "misc_000002"]),
        "misc_2": ("misc_000003", ["misc_000003"]),
    }.items():
        (root / "gt" / f"{q}_query.txt").write_text(f"oxc1_{image} 1 1 30 25\n")
        (root / "gt" / f"{q}_good.txt").write_text("\n".join(good) + "\n")
        (root / "gt" / f"{q}_ok.txt").write_text("")
        (root / "gt" / f"{q}_junk.txt").write_text("tower_000005\n")
    return root


class _Server:
    """Serves `files` (name -> bytes) with HTTP Range support; `cut[name] = n` makes the next full GET of that
    file announce the whole length but stop after n bytes (a dropped connection)."""

    def __init__(self):
        self.files: dict[str, bytes] = {}
        self.cut: dict[str, int] = {}
        self.requests: list[tuple[str, str | None]] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep pytest output clean
                pass

            def do_GET(self):
                name = self.path.lstrip("/")
                rng = self.headers.get("Range")
                server.requests.append((name, rng))
                data = server.files.get(name)
                if data is None:
                    self.send_error(404)
                    return
                start = 0
                if rng:
                    start = int(rng.removeprefix("bytes=").split("-")[0])
                    if start >= len(data):
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(data)}")
                        self.end_headers()
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                body = data[start:]
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                n = server.cut.pop(name, None) if not rng else None
                self.wfile.write(body if n is None else body[:n])
                if n is not None:
                    self.close_connection = True

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


def _tgz(root: Path, sub: str, arcdir: str) -> bytes:
    """A gzip tarball of root/sub with members under arcdir/ (nested, like the Paris archives)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for p in sorted((root / sub).iterdir()):
            tar.add(p, arcname=f"{arcdir}/{p.name}")
    return buf.getvalue()


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def server(tmp_path):
    src = make_oxford(tmp_path / "src")
    with _Server() as s:
        s.files["oxbuild_images-v1.tgz"] = _tgz(src, "jpg", "oxbuild_images/deep")
        s.files["gt_files_170407.tgz"] = _tgz(src, "gt", ".")
        s.files["gnd_roxford5k.pkl"] = pickle.dumps(
            {
                "imlist": sorted(TINY_IMAGES),
                "qimlist": ["tower_000001"],
                "gnd": [{"bbx": [1.0, 1.0, 20.0, 20.0], "easy": [0, 1], "hard": [2], "junk": [4]}],
            }
        )
        s.urls = {name: f"{s.url}/{name}" for name in s.files}
        s.sums = {name: _sha(data) for name, data in s.files.items()}
        yield s


def test_download_lays_out_a_loadable_dataset(server, tmp_path):
    dest = tmp_path / "data"
    root = download_dataset("oxford5k", dest, urls=server.urls, checksums=server.sums, progress=False)
    assert root == dest / "oxford5k"
    ds = load_dataset("oxford5k", dest)
    assert ds.images == sorted(TINY_IMAGES) and len(ds.queries) == 4
    # Archives are kept, so a second run and the revisited set fetch nothing new for the images.
    n = len(server.requests)
    download_dataset("oxford5k", dest, urls=server.urls, checksums=server.sums, progress=False)
    download_dataset("roxford5k", dest, urls=server.urls, checksums=server.sums, progress=False)
    assert [r[0] for r in server.requests[n:]] == ["gnd_roxford5k.pkl"]
    assert load_dataset("roxford5k", dest).gnd[0]["ok"] == [0, 1, 2]
    assert (dest / "roxford5k" / "jpg").is_symlink()


def test_checksum_mismatch_names_file_expected_and_got(server, tmp_path):
    wrong = "0" * 64
    with pytest.raises(ChecksumError) as err:
        fetch(
            server.urls["gt_files_170407.tgz"], tmp_path / "gt_files_170407.tgz", sha256=wrong, progress=False
        )
    msg = str(err.value)
    assert "gt_files_170407.tgz" in msg and wrong in msg and server.sums["gt_files_170407.tgz"] in msg
    assert not (tmp_path / "gt_files_170407.tgz").exists()
    assert not (tmp_path / "gt_files_170407.tgz.part").exists()  # a bad file is not resumed


def test_interrupted_download_resumes_with_range(server, tmp_path):
    name = "oxbuild_images-v1.tgz"
    size = len(server.files[name])
    server.cut[name] = size // 3
    dest = tmp_path / name
    with pytest.raises(DownloadError, match="run again to resume"):
        fetch(server.urls[name], dest, sha256=server.sums[name], progress=False)
    part = dest.with_name(name + ".part")
    assert part.stat().st_size == size // 3 and not dest.exists()
    fetch(server.urls[name], dest, sha256=server.sums[name], progress=False)
    assert server.requests[-1] == (name, f"bytes={size // 3}-")
    assert dest.read_bytes() == server.files[name] and not part.exists()


def test_complete_part_file_is_finished_without_refetching_bytes(server, tmp_path):
    name = "gnd_roxford5k.pkl"
    (tmp_path / f"{name}.part").write_bytes(server.files[name])  # crashed after the last byte, before rename
    fetch(server.urls[name], tmp_path / name, sha256=server.sums[name], progress=False)
    assert (tmp_path / name).read_bytes() == server.files[name]


def test_http_error_and_cli(server, tmp_path, capsys):
    with pytest.raises(DownloadError, match="HTTP 404"):
        fetch(f"{server.url}/nope.tgz", tmp_path / "nope.tgz", progress=False)
    args = ["oxford5k", "--dest", str(tmp_path / "cli"), "--no-progress"]
    for name, url in server.urls.items():
        args += ["--url", f"{name}={url}"]
    assert main(args + ["--sha256", f"gt_files_170407.tgz={'1' * 64}"]) == 1
    assert "checksum mismatch for gt_files_170407.tgz" in capsys.readouterr().err
    assert main(args) == 0  # no checksum pinned: it prints the digest to pin
    out = capsys.readouterr().out
    assert f"sha256 {server.sums['gt_files_170407.tgz']}" in out and "12 images, 4 queries" in out


def test_revisited_alone_extracts_its_own_images(server, tmp_path):
    root = download_dataset(
        "roxford5k", tmp_path / "d", urls=server.urls, checksums=server.sums, progress=False
    )
    assert (root / "jpg").is_dir() and not (root / "jpg").is_symlink()
    assert (root / "gnd_roxford5k.pkl").read_bytes() == server.files["gnd_roxford5k.pkl"]
    assert len(load_dataset("roxford5k", tmp_path / "d").images) == len(TINY_IMAGES)
