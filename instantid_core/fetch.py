"""Reads of user-supplied inputs: `s3://` objects in an allow-listed bucket (`read_uri`) and http(s) URLs from
allow-listed hosts, with no redirects (`fetch_url`). Deny by default: every other scheme, bucket or host is refused
with a typed error naming the input."""

from __future__ import annotations

import urllib.error
import urllib.parse
import urllib.request
from typing import Any

from .errors import ImageTooLarge, InputNotAllowed, InputNotFound, InvalidParameter
from .storage import make_s3_client, parse_location, s3_get


def read_uri(
    uri: str, *, allowed_buckets: list[str] | None, s3_client: Any = None, max_bytes: int | None = None
) -> bytes:
    """Read a user-supplied input URI: only `s3://` objects in an allow-listed bucket.

    Args:
        uri: `s3://bucket/key`.
        allowed_buckets: buckets inputs may come from; None or empty allows none (deny by default).
        s3_client: a boto3 S3 client; pass one in hot paths, creating a client costs tens of milliseconds.
        max_bytes: refuse larger objects before reading their body.

    Raises:
        InputNotAllowed: another scheme, a bucket not in the list, or S3 denies access.
        InputNotFound: the key (or bucket) does not exist.
        ImageTooLarge: the object is larger than `max_bytes`.
        StorageError: S3 could not be reached.
    """
    scheme = uri.split("://", 1)[0] if "://" in uri else "a local path"
    if scheme != "s3":
        raise InputNotAllowed(f"input URI scheme {scheme!r} is not allowed; use s3://bucket/key", field="uri")
    loc = parse_location(uri)
    if not loc.bucket or not loc.key:
        raise InvalidParameter(f"{uri[:200]!r} is not an s3://bucket/key URI", field="uri")
    if loc.bucket not in (allowed_buckets or []):
        raise InputNotAllowed(
            f"bucket {loc.bucket!r} is not an allowed input bucket (allowed: {sorted(allowed_buckets or [])})",
            field="uri",
        )
    return s3_get(s3_client or make_s3_client(), loc.bucket, loc.key, max_bytes=max_bytes)


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None  # a redirect could lead off the allowed hosts: answered as an error instead


def fetch_url(url: str, *, allowed_hosts: list[str], max_bytes: int, timeout_s: float = 10.0) -> bytes:
    """Fetch a user-supplied http(s) image URL from an allow-listed host (exact host names, no redirects).

    Raises:
        InvalidParameter: not an http(s) URL, or the host could not be reached or answered an error.
        InputNotAllowed: the host is not in `allowed_hosts`, or it answered with a redirect.
        InputNotFound: the host answered 404 or 410.
        ImageTooLarge: the body is larger than `max_bytes` (read no further than that).
    """
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise InvalidParameter(f"{url[:200]!r} is not an http(s) URL", field="uri")
    if parts.hostname.lower() not in {host.lower() for host in allowed_hosts}:
        raise InputNotAllowed(f"host {parts.hostname!r} is not an allowed input host", field="uri")
    opener = urllib.request.build_opener(_NoRedirects)
    request = urllib.request.Request(url, headers={"User-Agent": "instantid-serve"})
    try:
        with opener.open(request, timeout=timeout_s) as response:
            data = response.read(max_bytes + 1)
    except urllib.error.HTTPError as err:
        if err.code in (404, 410):
            raise InputNotFound(f"{url[:200]} does not exist (HTTP {err.code})", field="uri") from None
        if 300 <= err.code < 400:
            raise InputNotAllowed(f"{url[:200]} redirects; redirects are not followed", field="uri") from None
        raise InvalidParameter(f"{url[:200]} answered HTTP {err.code}", field="uri") from None
    except (urllib.error.URLError, OSError) as err:  # refused, DNS, timeout
        reason = getattr(err, "reason", err)
        raise InvalidParameter(f"could not fetch {url[:200]}: {reason}", field="uri") from None
    if len(data) > max_bytes:
        raise ImageTooLarge(f"{url[:200]} is larger than {max_bytes} bytes", field="uri")
    return data
