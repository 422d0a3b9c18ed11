"""Browser-usable URLs for stored images: presigned S3 GET URLs, or paths under a CDN base. Never `s3://`."""
from __future__ import annotations

from typing import Any
from urllib.parse import quote, unquote, urlparse

from connectors.storage import parse_store_url


class ImageUrls:
    def __init__(self, storage_url: str, *, endpoint_url: str | None = None, cdn_base_url: str | None = None,
                 expiry_s: int = 3600, client: Any = None):
        self._location = parse_store_url(storage_url)
        self._cdn = cdn_base_url.rstrip("/") if cdn_base_url else None
        self._expiry_s = expiry_s
        self._endpoint = endpoint_url
        self._client = client

    def url_for(self, uri: str) -> str | None:
        """The URL a browser fetches `uri` at; None when there is none (a local folder and no CDN base)."""
        parsed = urlparse(uri)
        if parsed.scheme == "s3":
            key = parsed.path.lstrip("/")
            if self._cdn:
                return f"{self._cdn}/{quote(key)}"
            return str(self._s3().generate_presigned_url(
                "get_object", Params={"Bucket": parsed.netloc, "Key": key}, ExpiresIn=self._expiry_s))
        if parsed.scheme == "file" and self._cdn and self._location.folder is not None:
            root = self._location.folder.expanduser().resolve()
            path = unquote(parsed.path)
            if path.startswith(str(root) + "/"):
                return f"{self._cdn}/{quote(path[len(str(root)) + 1:])}"
        return None

    def _s3(self) -> Any:
        if self._client is None:  # presigning is computed here; no request goes to S3
            import boto3
            from botocore.config import Config

            config = Config(signature_version="s3v4",
                            s3={"addressing_style": "path"} if self._endpoint else {})
            self._client = boto3.session.Session().client("s3", endpoint_url=self._endpoint, config=config)
        return self._client
