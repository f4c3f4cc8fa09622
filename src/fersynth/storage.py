"""Local paths and s3:// URIs for model files: S3 objects are downloaded once into a cache.

The S3 endpoint and credentials come from the environment (AWS_ENDPOINT_URL,
AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, or an AWS profile), never from parameters.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from urllib.parse import urlparse

from fersynth.errors import FersynthError

CACHE_ENV = "FERSYNTH_CACHE"


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV, Path.home() / ".cache" / "fersynth"))


def is_s3(uri: str) -> bool:
    return str(uri).startswith("s3://")


def _client():
    import boto3
    from botocore.config import Config

    config = Config(retries={"max_attempts": 3, "mode": "standard"}, connect_timeout=10, read_timeout=60)
    return boto3.client("s3", config=config)


def _split(uri: str) -> tuple[str, str]:
    parsed = urlparse(uri)
    bucket, key = parsed.netloc, parsed.path.lstrip("/")
    if not bucket or not key:
        raise FersynthError(f"{uri}: expected s3://BUCKET/KEY")
    return bucket, key


def fetch_folder(uri: str | Path) -> Path:
    """A local folder for `uri`: the folder itself, or the cached download of an s3:// prefix."""
    text = str(uri)
    if not is_s3(text):
        path = Path(text).expanduser()
        if not path.is_dir():
            raise FersynthError(f"{path}: folder not found")
        return path
    from botocore.exceptions import BotoCoreError, ClientError

    bucket, prefix = _split(text.rstrip("/") + "/")
    target = cache_dir() / "s3" / hashlib.sha256(text.encode()).hexdigest()[:16]
    if (target / ".complete").is_file():
        return target
    client = _client()
    try:
        pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        keys = [item["Key"] for page in pages for item in page.get("Contents", [])]
        if not keys:
            raise FersynthError(f"{text}: no objects under this prefix")
        for key in keys:
            local = target / key[len(prefix) :]
            local.parent.mkdir(parents=True, exist_ok=True)
            partial = local.with_name(f".{local.name}.partial")
            client.download_file(bucket, key, str(partial))
            partial.replace(local)
    except (BotoCoreError, ClientError) as exc:
        raise FersynthError(f"{text}: download from {client.meta.endpoint_url} failed ({exc})") from None
    (target / ".complete").touch()
    return target


def fetch(uri: str | Path) -> Path:
    """A local file for `uri`: the path itself, or the cached download of an s3:// object."""
    text = str(uri)
    if not is_s3(text):
        path = Path(text).expanduser()
        if not path.is_file():
            raise FersynthError(f"{path}: file not found")
        return path
    bucket, key = _split(text)
    from botocore.exceptions import BotoCoreError, ClientError

    digest = hashlib.sha256(text.encode()).hexdigest()[:16]
    target = cache_dir() / "s3" / digest / Path(key).name
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.name}.partial")
    client = _client()
    try:
        client.download_file(bucket, key, str(partial))
    except (BotoCoreError, ClientError) as exc:
        partial.unlink(missing_ok=True)
        endpoint = client.meta.endpoint_url
        raise FersynthError(f"{text}: download from {endpoint} failed ({exc})") from None
    partial.replace(target)
    return target
