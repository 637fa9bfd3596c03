"""Credentials in URLs never leave the process: what is logged or shown has them replaced by REDACTED.

A data URL may carry a secret (`https://user:token@host/shards`, a presigned `?X-Amz-Signature=...`,
`?sig=...&token=...`). The pipeline reads the data with the URL as given; everything it writes for people
or other tools (MLflow params and tags, error lines, logs, manifests, metrics JSON) goes through here.
Redacted: the whole userinfo (`user:token@` -> `REDACTED@`), and the value of every query parameter whose
name looks secret (SECRET_KEYS, case-insensitive, any `X-Amz-*`). Host, path and other parameters stay, so
a redacted URL still says where the data was.
"""

import re
from urllib.parse import parse_qsl, quote, urlsplit, urlunsplit

MASK = "REDACTED"
# Query parameter names that hold secrets: signed-URL schemes (AWS, GCS, Azure SAS) and the usual tokens.
SECRET_KEYS = re.compile(
    r"^(x-amz-.*|x-goog-.*|sig|signature|se|sp|sv|skoid|sktid|token|access_token|id_token|auth|"
    r"authorization|key|api_key|apikey|secret|client_secret|password|passwd|pwd|credential|credentials|"
    r"session|sessiontoken|security-token|code)$",
    re.IGNORECASE,
)
_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*://[^\s'\"<>)\]},]+")


def redact_url(url: str) -> str:
    """The URL with its userinfo and secret-looking query values replaced by REDACTED."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return MASK  # not parseable: show nothing of it
    netloc = parts.netloc
    if "@" in netloc:
        netloc = f"{MASK}@{netloc.rpartition('@')[2]}"
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        if any(SECRET_KEYS.match(k) for k, _ in pairs):
            query = "&".join(
                f"{quote(k, safe='-_.')}={MASK if SECRET_KEYS.match(k) else quote(v, safe='-_.~/')}"
                for k, v in pairs
            )
    if (netloc, query) == (parts.netloc, parts.query):
        return url
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def redact_text(text: str) -> str:
    """Every URL in a line of text redacted (error lines, log messages)."""
    if "://" not in text:
        return text
    return _URL.sub(_redact_match, text)


def _redact_match(match: re.Match) -> str:
    url = match.group(0)
    core = url.rstrip(".:;!?")  # punctuation after a URL in a sentence ("source URL: not found")
    return redact_url(core) + url[len(core) :]


def redact(obj):
    """A JSON-like value (dicts, lists, strings) with every URL in its strings redacted."""
    if isinstance(obj, str):
        return redact_text(obj)
    if isinstance(obj, dict):
        return {k: redact(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(redact(v) for v in obj)
    return obj
