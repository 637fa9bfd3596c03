"""Where a source's bytes come from: the filesystem for its URL, and one-line errors that say what failed.

S3 is opened with bounded waits. botocore's defaults (legacy retry mode, 5 attempts, a 60 s connect
timeout) spend about 10 s on an endpoint that refuses connections and minutes on one that drops them,
per call, and the prepare_data stage retries the whole read on top of that ([2, 5, 10] s). Here one call
makes 3 attempts ("standard" mode) with a 10 s connect and a 60 s read timeout, so a gone endpoint fails
the stage in well under a minute and a blip is still bridged by the stage's own retries. A user's
AWS_MAX_ATTEMPTS / AWS_RETRY_MODE still win over these.
"""

import os

import fsspec

from vim_core.errors import TransientError, VimError
from vim_core.io import url_fs

S3_CONNECT_TIMEOUT_S = 10
S3_READ_TIMEOUT_S = 60
S3_MAX_ATTEMPTS = 3

# Exception class names (anywhere in the MRO) that mean the endpoint went away, not that the request was
# wrong: botocore's ConnectionError and HTTPClientError (refused, reset, closed mid-response), aiohttp's
# ClientConnectionError and ClientPayloadError (a body cut short), http.client's IncompleteRead, and the
# builtins ConnectionError and TimeoutError.
_UNREACHABLE = {
    "ConnectionError",
    "HTTPClientError",
    "ClientConnectionError",
    "ClientPayloadError",
    "IncompleteRead",
    "TimeoutError",
}


def _user_sets_s3_retries() -> bool:
    return bool({"AWS_MAX_ATTEMPTS", "AWS_RETRY_MODE"} & set(os.environ))


def s3_config() -> dict:
    """botocore Config arguments for one S3 call (see the module docstring)."""
    config: dict = {"connect_timeout": S3_CONNECT_TIMEOUT_S, "read_timeout": S3_READ_TIMEOUT_S}
    if not _user_sets_s3_retries():
        config["retries"] = {"mode": "standard", "max_attempts": S3_MAX_ATTEMPTS}
    return config


def s3_retry_env() -> dict[str, str]:
    """The same retry bound as environment variables, for a child process that calls S3 (`dvc push`);
    nothing when the user set their own."""
    if _user_sets_s3_retries():
        return {}
    return {"AWS_RETRY_MODE": "standard", "AWS_MAX_ATTEMPTS": str(S3_MAX_ATTEMPTS)}


def open_fs(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem and path for a source URL; s3:// with the bounded waits above."""
    if url.startswith(("s3://", "s3a://")):
        return fsspec.core.url_to_fs(url, config_kwargs=s3_config())
    return url_fs(url)


def endpoint_of(fs) -> str:
    """The endpoint an S3 filesystem talks to, for error messages."""
    client = getattr(fs, "_s3", None)
    url = client.meta.endpoint_url if client is not None else None
    url = (
        url
        or getattr(fs, "endpoint_url", None)
        or (getattr(fs, "client_kwargs", None) or {}).get("endpoint_url")
    )
    return url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or "AWS S3"


def io_error(url: str, err: Exception, fs=None, obj: str | None = None) -> VimError:
    """A one-line error for a storage failure; a TransientError (worth retrying) if the endpoint went away."""
    if _unreachable(err):
        where = f"storage endpoint {endpoint_of(fs)}" if fs is not None and "s3" in fs.protocol else "storage"
        reading = f" reading {obj}" if obj else ""
        return TransientError(f"source {url}: {where} unreachable{reading} ({type(err).__name__})")
    message = describe_io_error(url, err)
    return TransientError(message) if "unreachable" in message else VimError(message)


def _unreachable(err: Exception) -> bool:
    if isinstance(err, (FileNotFoundError, PermissionError)):
        return False
    return any(cls.__name__ in _UNREACHABLE for cls in type(err).__mro__)


def describe_io_error(url: str, err: Exception) -> str:
    """Turn an fsspec/botocore failure into one line that names the likely cause."""
    text = f"{type(err).__name__}: {err}"
    low = text.lower()
    if "nosuchbucket" in low or "bucket does not exist" in low or "specified bucket" in low:
        return f"source {url}: the S3 bucket does not exist"
    if any(
        s in low for s in ("invalidaccesskeyid", "signaturedoesnotmatch", "accessdenied", "forbidden", "403")
    ):
        return f"source {url}: S3 refused the credentials (check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY)"
    if isinstance(err, PermissionError):
        return f"source {url}: permission denied ({err})"
    if isinstance(err, FileNotFoundError):
        return f"source {url}: not found"
    if "could not connect" in low or "connect timeout" in low or "endpoint" in low:
        return f"source {url}: storage endpoint unreachable ({type(err).__name__})"
    return f"source {url}: {text.splitlines()[0]}"
