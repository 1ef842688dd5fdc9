"""Reading a chat request's images: `data:` URIs always; local files and http(s) URLs only when the
worker allows them. Limits on bytes and pixels; every failure is the request's fault (ImageError).
No torch here: this runs at admission, before the model sees anything.
"""

from __future__ import annotations

import base64
import binascii
import io
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

DEFAULT_MAX_IMAGE_BYTES = 20 * 1024 * 1024
DEFAULT_MAX_IMAGE_PIXELS = 16 * 1024 * 1024


class ImageError(Exception):
    """An image part that cannot be used: the request fails alone with invalid_request."""


@dataclass(frozen=True)
class ImagePolicy:
    allow_urls: bool = False  # http(s):// images, fetched by the worker
    allow_files: bool = False  # file:// URLs and plain local paths, read by the worker
    max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES  # encoded size of one image
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS  # width x height of one image
    fetch_timeout_s: float = 10.0

    def is_remote(self, url: str) -> bool:
        """True for a source that needs I/O (a file or a URL), which must not run on the loop thread."""
        return not url.startswith("data:")

    def read(self, url: str) -> bytes:
        """The encoded bytes of one image part's `image_url.url`."""
        if url.startswith("data:"):
            return _data_uri(url, self.max_image_bytes)
        scheme = urllib.parse.urlsplit(url).scheme.lower()
        if scheme in ("http", "https"):
            if not self.allow_urls:
                raise ImageError("this worker does not fetch image URLs (start it with --allow-image-urls); "
                                 "send the image as a data: URI")
            return _fetch(url, self.max_image_bytes, self.fetch_timeout_s)
        if scheme in ("file", "") or (len(scheme) == 1 and url[1:3] in (":\\", ":/")):
            if not self.allow_files:
                raise ImageError("this worker does not read local image files (start it with --allow-image-files); "
                                 "send the image as a data: URI")
            path = urllib.parse.urlsplit(url).path if scheme == "file" else url
            return _read_file(Path(urllib.parse.unquote(path)), self.max_image_bytes)
        raise ImageError(f"unsupported image URL scheme {scheme!r}: use a data: URI")

    def open(self, data: bytes):
        """Decode and check an image; returns an RGB PIL image."""
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(io.BytesIO(data)) as probe:
                width, height = probe.size  # read from the header: nothing is decoded yet
                if width * height > self.max_image_pixels:
                    raise ImageError(f"the image is {width}x{height} pixels; this worker's limit is "
                                     f"{self.max_image_pixels} pixels")
                probe.load()
                return probe.convert("RGB")
        except ImageError:
            raise
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
            raise ImageError(f"the image cannot be decoded: {exc}") from None


def _data_uri(url: str, max_bytes: int) -> bytes:
    header, sep, payload = url.partition(",")
    if not sep:
        raise ImageError("a data: URI needs a ',' before its payload")
    if not header.endswith(";base64"):
        raise ImageError("an image data: URI must be base64 (data:image/png;base64,...)")
    if len(payload) * 3 // 4 > max_bytes + 3:
        raise ImageError(f"the image is over this worker's limit of {max_bytes} bytes")
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise ImageError("the data: URI's payload is not valid base64") from None
    if len(data) > max_bytes:
        raise ImageError(f"the image is {len(data)} bytes; this worker's limit is {max_bytes}")
    return data


def _fetch(url: str, max_bytes: int, timeout_s: float) -> bytes:
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:  # noqa: S310 - schemes checked above
            data = response.read(max_bytes + 1)
    except urllib.error.HTTPError as exc:
        exc.close()  # it holds the response
        raise ImageError(f"cannot fetch the image: HTTP {exc.code} {exc.reason}") from None
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise ImageError(f"cannot fetch the image: {exc}") from None
    if len(data) > max_bytes:
        raise ImageError(f"the image is over this worker's limit of {max_bytes} bytes")
    return data


def _read_file(path: Path, max_bytes: int) -> bytes:
    try:
        with path.open("rb") as f:
            data = f.read(max_bytes + 1)
    except OSError as exc:
        raise ImageError(f"cannot read the image file: {exc.strerror or exc}") from None
    if len(data) > max_bytes:
        raise ImageError(f"the image is over this worker's limit of {max_bytes} bytes")
    return data


class ImageFetcher:
    """Reads the file and URL images of chat requests on a small thread pool, so that a slow or silent
    server never stalls the loop thread; a request comes back with those images inlined as data: URIs
    (the engine then reads only data: URIs) or the future raises ImageError."""

    def __init__(self, policy: ImagePolicy, max_workers: int = 4):
        from concurrent.futures import ThreadPoolExecutor

        self.policy = policy
        self._pool = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="redbatch-images")

    def needs_fetch(self, request) -> bool:
        """True when the request names an image this worker is allowed to fetch or read."""
        return any(self._is_fetched(url) for url in _image_urls(request))

    def submit(self, request):
        """A Future of the request with its fetched images inlined."""
        return self._pool.submit(self._inline, request)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _is_fetched(self, url: str) -> bool:
        if url.startswith("data:"):
            return False
        scheme = urllib.parse.urlsplit(url).scheme.lower()
        return self.policy.allow_urls if scheme in ("http", "https") else self.policy.allow_files

    def _inline(self, request):
        body = request.body.model_dump(mode="json", exclude_none=True)
        for message in body["messages"]:
            for part in message["content"] if isinstance(message.get("content"), list) else []:
                url = part.get("image_url", {}).get("url", "")
                if part["type"] == "image_url" and self._is_fetched(url):
                    data = self.policy.read(url)
                    part["image_url"]["url"] = "data:application/octet-stream;base64," + base64.b64encode(data).decode()
        return request.model_copy(update={"body": type(request.body).model_validate(body)})


def _image_urls(request) -> list[str]:
    messages = getattr(request.body, "messages", None) or []
    return [p.image_url.url for m in messages if isinstance(m.content, list)
            for p in m.content if p.type == "image_url"]
