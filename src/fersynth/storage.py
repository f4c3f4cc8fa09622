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


def fetch(uri: str | Path) -> Path:
    """A local file for `uri`: the path itself, or the cached download of an s3:// object."""
    text = str(uri)
    if not is_s3(text):
        path = Path(text).expanduser()
        if not path.is_file():
            raise FersynthError(f"{path}: file not found")
        return path
    parsed = urlparse(text)
    bucket, key = parsed.netloc, parsed.path.lstrip("/")
    if not bucket or not key:
        raise FersynthError(f"{text}: expected s3://BUCKET/KEY")
    import boto3
    from botocore.config import Config
    from botocore.exceptions import BotoCoreError, ClientError

    digest = hashlib.sha256(text.encode()).hexdigest()[:16]
    target = cache_dir() / "s3" / digest / Path(key).name
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.name}.partial")
    config = Config(retries={"max_attempts": 3, "mode": "standard"}, connect_timeout=10)
    client = boto3.client("s3", config=config)
    try:
        client.download_file(bucket, key, str(partial))
    except (BotoCoreError, ClientError) as exc:
        partial.unlink(missing_ok=True)
        endpoint = client.meta.endpoint_url
        raise FersynthError(f"{text}: download from {endpoint} failed ({exc})") from None
    partial.replace(target)
    return target
