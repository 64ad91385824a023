"""Links that expire: every image of a response gets one, living `output.url_ttl_s` seconds (the Ingress's
`links.default_ttl_s` when the request gives none; above `links.max_ttl_s` the request answers 400).

- s3:// outputs: a presigned GET URL straight to the bucket (boto3's `generate_presigned_url`, SigV4), which S3
  refuses with 403 once it has expired.
- file:// outputs: a link to this app's outputs route, `v1/outputs?uri=...&expires=...&sig=...`, where `sig` is
  HMAC-SHA256 over the URI and the expiry. The route serves it without an API key until `expires`, and answers 403
  after, or when any part of it was changed.

The HMAC key comes from the environment variable `links.secret_env` (a Kubernetes Secret); every Ingress replica
must see the same. Unset, it is a random key kept beside the file:// outputs (`<output dir>/.link-secret`, made
once, never served): the replicas that share that folder, and so can serve its files, share the key.

Links are made once the images are written (so a job's links count from its end); a file:// link is relative to
the app's root until an HTTP answer makes it absolute with `public_url` (the request's base URL, route prefix and a
TLS proxy's X-Forwarded-* headers), since the handle API has no address of its own.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import secrets
import time
import uuid
from functools import cached_property
from pathlib import Path
from urllib.parse import urlencode, urlsplit

from fastapi import Request

from instantid_app.settings import LinkSettings
from instantid_core.errors import InvalidParameter
from instantid_core.storage import OutputStore

from .errors import LinkExpired, LinkInvalid

OUTPUTS_ROUTE = "v1/outputs"  # the playground's route (deployments/playground: http_output)
SECRET_FILE = ".link-secret"  # beside file:// outputs; the outputs route serves only output names, never this
TTL_FIELD = "output.url_ttl_s"
FORWARDED_HOST = re.compile(r"[A-Za-z0-9.-]+(?::\d{1,5})?|\[[0-9A-Fa-f:.]+\](?::\d{1,5})?")


def link_ttl(requested: int | None, settings: LinkSettings) -> int:
    """The lifetime of a request's links (0: none): its own, or the server's default; above the bound a 400."""
    ttl = settings.default_ttl_s if requested is None else requested
    if ttl > settings.max_ttl_s:
        raise InvalidParameter(f"{TTL_FIELD}: at most {settings.max_ttl_s} s on this server, got {ttl}",
                               field=TTL_FIELD)
    return ttl


def sign(secret: bytes, uri: str, expires: int) -> str:
    """The signature of a link to `uri` valid until `expires` (Unix seconds)."""
    return hmac.new(secret, f"{uri}\n{expires}".encode(), hashlib.sha256).hexdigest()


def verify(secret: bytes | None, uri: str, expires: int | None, sig: str | None, now: float | None = None) -> None:
    """Raise LinkInvalid unless `sig` signs `uri` and `expires`, then LinkExpired when `expires` has passed (the
    signature first: an altered expiry is an invalid link, not a live one)."""
    if secret is None or expires is None or not sig or not hmac.compare_digest(sign(secret, uri, expires), sig):
        raise LinkInvalid("this link's signature does not match it (a changed link, or another server's): use "
                          "the `urls` of a response as given", field="sig")
    if (time.time() if now is None else now) >= expires:
        raise LinkExpired("this link has expired: generate again, or fetch the output by its URI (with an API key "
                          "where the server needs one)", field="expires")


def shared_secret(settings: LinkSettings, store: OutputStore) -> bytes | None:
    """The key that signs file:// links (see the module's docstring); None for s3:// outputs without the
    environment variable, which need none."""
    value = os.environ.get(settings.secret_env)
    if value:
        return value.encode()
    base = store.base_uri
    return _secret_beside(Path(base.removeprefix("file://"))) if base.startswith("file://") else None


def _secret_beside(folder: Path) -> bytes:
    """The key in `folder/.link-secret`, made by whichever replica comes first: written under a temporary name,
    then linked into place, which fails when another replica's is there (then that one is read)."""
    path = folder / SECRET_FILE
    if not path.exists():
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f".{SECRET_FILE}.{uuid.uuid4().hex}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as file:
            file.write(secrets.token_hex(32))
        try:
            os.link(tmp, path)
        except FileExistsError:
            pass
        finally:
            tmp.unlink(missing_ok=True)
    return path.read_bytes().strip()


class OutputLinks:
    """Makes and checks the links to one store's outputs."""

    def __init__(self, store: OutputStore, settings: LinkSettings) -> None:
        self.store, self.secret = store, shared_secret(settings, store)

    def make(self, uris: list[str], ttl_s: int, now: float | None = None) -> tuple[list[str], int]:
        """One link per output URI and the Unix time they expire."""
        expires = int(time.time() if now is None else now) + ttl_s
        return [self.link(uri, ttl_s, expires) for uri in uris], expires

    def link(self, uri: str, ttl_s: int, expires: int) -> str:
        if uri.startswith("s3://"):
            return self.store.presigned_url(uri, ttl_s)
        if self.secret is None:  # not reached: a file:// store always has a key
            raise LinkInvalid("no key to sign links to file:// outputs")
        return f"{OUTPUTS_ROUTE}?" + urlencode({"uri": uri, "expires": expires, "sig": sign(self.secret, uri, expires)})

    def verify(self, uri: str, expires: int | None, sig: str | None, now: float | None = None) -> None:
        verify(self.secret, uri, expires, sig, now)

    @cached_property
    def image_origin(self) -> str | None:
        """The origin presigned URLs point at (for the playground's Content-Security-Policy img-src); None for
        file:// outputs, whose links are this app's own."""
        if not self.store.base_uri.startswith("s3://"):
            return None
        try:
            url = urlsplit(self.store.presigned_url(f"{self.store.base_uri}/origin-probe", 60))
        except Exception:  # noqa: BLE001 - no credentials yet: the page then shows images through /v1/outputs
            return None
        return f"{url.scheme}://{url.netloc}"


def public_url(request: Request, link: str) -> str:
    """A link as an HTTP answer gives it: presigned URLs as they are, links to this app's routes absolute, from the
    request's base URL (route prefix included) and, behind a TLS proxy, its X-Forwarded-Proto and -Host."""
    if not link.startswith(f"{OUTPUTS_ROUTE}?"):
        return link
    url = request.url_for("http_output").replace(query=link.split("?", 1)[1])
    proto = request.headers.get("x-forwarded-proto", "").split(",")[0].strip()
    host = request.headers.get("x-forwarded-host", "").split(",")[0].strip()
    if proto in ("http", "https"):
        url = url.replace(scheme=proto)
    if host and FORWARDED_HOST.fullmatch(host):
        url = url.replace(netloc=host)
    return str(url)
