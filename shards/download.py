"""Download IXI-T1.tar / IXI-T2.tar with HTTP Range resume and MD5 verification.

Bytes go to `NAME.part`; only a file whose checksum matches is renamed to `NAME`, so a file that looks
complete always is. A server that announces or sends more than `MAX_BYTES`, or more than the disk has free,
is refused before it can fill the disk.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import shutil
import time
import urllib.error
import urllib.request
from pathlib import Path

from tqdm import tqdm

IXI_BASE_URL = "http://biomedic.doc.ic.ac.uk/brain-development/downloads/IXI/"
IXI_MD5 = {"T1": "34901a0593b41dd19c1a1f746eac2d58", "T2": "e3140d78730ecdd32ba92da48c0a9aaa"}
CHUNK = 1 << 20
MAX_BYTES = 8 << 30  # IXI-T1.tar and IXI-T2.tar are about 4.5 GB each; a longer body is not one of them


class DownloadError(RuntimeError):
    pass


def md5_of(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def _fetch_once(url: str, part: Path, timeout: float, progress: bool, max_bytes: int) -> None:
    """Append the rest of `url` to `part`, resuming with Range where the server allows it."""
    have = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as err:
        if err.code == 416 and have:  # our .part is already the whole file
            return
        raise
    with response:
        if have and response.status != 206:  # no Range support: start again from byte 0
            have = 0
        total = response.headers.get("Content-Length")
        total = int(total) + have if total is not None and total.isdigit() else None
        if total is not None:
            _check_room(url, part, total, have, max_bytes)
        with open(part, "ab" if have else "wb") as f, tqdm(total=total, initial=have, unit="B", unit_scale=True,
                                                           desc=Path(part).name, disable=not progress) as bar:
            written = have
            while block := response.read(CHUNK):
                written += len(block)
                if written > max_bytes:
                    break
                f.write(block)
                bar.update(len(block))
        if written > max_bytes:
            part.unlink()
            raise DownloadError(f"{url}: the server sent more than {max_bytes:,} bytes, more than an IXI tar; "
                                f"the partial file {part} was removed")
        if total is not None and part.stat().st_size < total:
            raise http.client.IncompleteRead(b"", total - part.stat().st_size)


def _check_room(url: str, part: Path, total: int, have: int, max_bytes: int) -> None:
    """Refuse a body longer than `max_bytes` or than the free space beside `part`, before writing any of it."""
    if total > max_bytes:
        raise DownloadError(f"{url}: the server announces {total:,} bytes, more than an IXI tar (at most {max_bytes:,})")
    free = shutil.disk_usage(part.parent).free
    if total - have > free:
        raise DownloadError(f"{url}: needs {total - have:,} more bytes but {part.parent} has {free:,} free")


def download(url: str, dest: Path, md5: str | None, retries: int = 5, timeout: float = 60.0,
             progress: bool = True, max_bytes: int = MAX_BYTES) -> Path:
    """Fetch `url` to `dest`, resuming `dest.part`; verify `md5`; rename only once it matches."""
    dest = Path(dest)
    if dest.exists():
        if md5 is None or md5_of(dest) == md5:
            print(f"{dest}: already downloaded and verified")
            return dest
        raise DownloadError(f"{dest} exists but its MD5 is not {md5}; delete it to download again")
    part = dest.with_name(dest.name + ".part")
    for attempt in range(retries + 1):
        try:
            _fetch_once(url, part, timeout, progress, max_bytes)
            break
        except (urllib.error.URLError, http.client.HTTPException, ConnectionError, TimeoutError, OSError) as err:
            if isinstance(err, urllib.error.HTTPError) and err.code < 500:
                raise DownloadError(f"{url}: HTTP {err.code} {err.reason}") from err
            if attempt == retries:
                raise DownloadError(f"{url}: gave up after {retries + 1} attempts ({err}); {part} is kept, run again to resume") from err
            wait = min(2 ** attempt, 30)
            print(f"{url}: {type(err).__name__}: {err}; resuming from byte {part.stat().st_size if part.exists() else 0} in {wait}s")
            time.sleep(wait)
    if md5 is not None:
        got = md5_of(part)
        if got != md5:
            part.unlink()
            raise DownloadError(f"{url}: MD5 {got} does not match the expected {md5}; the partial file was removed")
    os.replace(part, dest)
    return dest


def download_ixi(out: str | os.PathLike, modalities=("T1", "T2"), base_url: str = IXI_BASE_URL,
                 md5: dict[str, str | None] | None = None, **kwargs) -> list[Path]:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    sums = {**IXI_MD5, **(md5 or {})}
    base = base_url if base_url.endswith("/") else base_url + "/"
    return [download(f"{base}IXI-{m}.tar", out / f"IXI-{m}.tar", sums.get(m), **kwargs) for m in modalities]
