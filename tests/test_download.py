"""shards download against a local HTTP server on 127.0.0.1 that serves a synthetic tar."""

import hashlib
import http.server
import shutil
import threading
from pathlib import Path

import pytest

from shards.download import DownloadError, download, download_ixi

PAYLOAD = bytes(range(256)) * 4096  # 1 MiB stand-in for IXI-T1.tar


class Handler(http.server.BaseHTTPRequestHandler):
    ranges = True  # the server honours Range
    drop_after: int | None = None  # close the connection after this many bytes, once
    endless = False  # no Content-Length, and bytes until the client hangs up
    claimed_length: int | None = None  # a Content-Length that is not the body's
    log: list = []

    def log_message(self, *args):
        pass

    def do_GET(self):
        cls = type(self)
        cls.log.append(self.headers.get("Range"))
        if self.path.endswith("missing.tar"):
            self.send_error(404)
            return
        if cls.endless:
            self.send_response(200)
            self.end_headers()
            try:
                while True:
                    self.wfile.write(PAYLOAD)
            except OSError:
                return
        start = 0
        if cls.ranges and self.headers.get("Range"):
            start = int(self.headers["Range"].split("=")[1].rstrip("-"))
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(PAYLOAD) - 1}/{len(PAYLOAD)}")
        else:
            self.send_response(200)
        body = PAYLOAD[start:]
        self.send_header("Content-Length", str(cls.claimed_length or len(body)))
        self.end_headers()
        if cls.drop_after is not None:
            self.wfile.write(body[: cls.drop_after])
            cls.drop_after = None
            self.wfile.flush()
            self.connection.shutdown(2)  # a connection dropped mid-file
            return
        self.wfile.write(body)


@pytest.fixture
def server():
    handler = type("H", (Handler,), {"ranges": True, "drop_after": None, "endless": False, "claimed_length": None, "log": []})
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield handler, f"http://127.0.0.1:{httpd.server_address[1]}/"
    httpd.shutdown()


MD5 = hashlib.md5(PAYLOAD).hexdigest()


def test_download_verifies_and_renames(server, tmp_path):
    handler, url = server
    (path,) = download_ixi(tmp_path, ["T1"], url, {"T1": MD5}, progress=False)
    assert path == tmp_path / "IXI-T1.tar" and path.read_bytes() == PAYLOAD
    assert not list(tmp_path.glob("*.part"))


def test_dropped_connection_resumes_with_range(server, tmp_path):
    handler, url = server
    handler.drop_after = 300_000
    download(url + "IXI-T1.tar", tmp_path / "IXI-T1.tar", MD5, progress=False)
    assert (tmp_path / "IXI-T1.tar").read_bytes() == PAYLOAD
    assert handler.log == [None, "bytes=300000-"]


def test_server_without_range_restarts_from_zero(server, tmp_path):
    handler, url = server
    handler.ranges = False
    (tmp_path / "IXI-T1.tar.part").write_bytes(PAYLOAD[:1000])  # a stale partial file
    download(url + "IXI-T1.tar", tmp_path / "IXI-T1.tar", MD5, progress=False)
    assert (tmp_path / "IXI-T1.tar").read_bytes() == PAYLOAD


def test_partial_file_resumes_on_next_run(server, tmp_path):
    handler, url = server
    (tmp_path / "IXI-T1.tar.part").write_bytes(PAYLOAD[:5000])
    download(url + "IXI-T1.tar", tmp_path / "IXI-T1.tar", MD5, progress=False)
    assert handler.log == ["bytes=5000-"]
    assert (tmp_path / "IXI-T1.tar").read_bytes() == PAYLOAD


def test_wrong_checksum_leaves_no_complete_looking_file(server, tmp_path):
    handler, url = server
    with pytest.raises(DownloadError, match="MD5"):
        download_ixi(tmp_path, ["T1"], url, progress=False)  # IXI's real checksum cannot match the stand-in
    assert not (tmp_path / "IXI-T1.tar").exists() and not (tmp_path / "IXI-T1.tar.part").exists()


def test_http_error_is_clear(server, tmp_path):
    handler, url = server
    with pytest.raises(DownloadError, match="404"):
        download(url + "missing.tar", tmp_path / "missing.tar", None, progress=False)


def test_a_body_without_length_stops_at_the_cap_and_leaves_nothing(server, tmp_path):
    handler, url = server
    handler.endless = True
    with pytest.raises(DownloadError, match=r"sent more than 3,145,728 bytes.*IXI-T1.tar.part was removed"):
        download(url + "IXI-T1.tar", tmp_path / "IXI-T1.tar", MD5, retries=0, progress=False, max_bytes=3 << 20)
    assert not list(tmp_path.iterdir())


def test_an_announced_length_past_the_cap_or_the_free_space_is_refused_before_writing(server, tmp_path, monkeypatch):
    handler, url = server
    handler.claimed_length = 1 << 40
    with pytest.raises(DownloadError, match=r"announces 1,099,511,627,776 bytes, more than an IXI tar"):
        download(url + "IXI-T1.tar", tmp_path / "IXI-T1.tar", MD5, retries=0, progress=False)
    assert not list(tmp_path.iterdir())
    handler.claimed_length = None
    monkeypatch.setattr("shards.download.shutil.disk_usage", lambda path: shutil._ntuple_diskusage(10 << 20, 10 << 20, 1000))
    with pytest.raises(DownloadError, match=f"needs 1,048,576 more bytes but {tmp_path} has 1,000 free"):
        download(url + "IXI-T1.tar", tmp_path / "IXI-T1.tar", MD5, retries=0, progress=False)
    assert not list(tmp_path.iterdir())


def test_cli_download(server, tmp_path):
    from conftest import run_module

    handler, url = server
    result = run_module("shards", "download", "--out", tmp_path, "--modality", "T1", "--base-url", url, "--md5", f"T1={MD5}")
    assert Path(result.stdout.strip()) == tmp_path / "IXI-T1.tar"
    bad = run_module("shards", "download", "--out", tmp_path / "b", "--modality", "T1", "--base-url", url, check=False)
    assert bad.returncode == 1 and "MD5" in bad.stderr
