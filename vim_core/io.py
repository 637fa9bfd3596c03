"""fsspec helpers: open any URL, write atomically, find weights files by checksum, hash specs."""

import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import fsspec

from vim_core.errors import VimError


def url_fs(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem and the path inside it for a local path or an fsspec URL."""
    fs, path = fsspec.core.url_to_fs(url)
    return fs, path


@contextmanager
def atomic_path(final: str | Path, suffix: str = "") -> Iterator[Path]:
    """Yield a temp path beside `final`; rename it over `final` only if the block succeeds."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=suffix + ".tmp", dir=final.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, 0o666 & ~_umask())
        os.replace(tmp_path, final)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(final: str | Path, data: bytes) -> None:
    with atomic_path(final) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(final: str | Path, text: str) -> None:
    atomic_write_bytes(final, text.encode())


def spec_hash(spec: dict, length: int = 16) -> str:
    """Short sha256 of a JSON-able spec, independent of key order.

    The one place config hashes are made: eval.json and the registry's tags hold hashes of this exact
    form (json.dumps with sorted keys and default separators), so it must not change.
    """
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:length]


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


FULL_SHA256 = 64  # hex digits of a whole sha256


def find_weights(
    weights_dir: str, filename: str, sha256: str | None, purpose: str, *, unpickled: bool = False
) -> str:
    """Locate a weights file under weights_dir (any fsspec URL), check its sha256, return a local path.

    `sha256` is the whole digest, or (for files loaded with weights_only=True) a prefix such as the one
    torchvision puts in its file names. A file that will be unpickled (`unpickled=True`: torch-fidelity
    loads Inception with weights_only=False) must be checked against the whole digest: a 32-bit prefix is
    a gate anyone can pass with a few billion tries, so a prefix is refused here as a programming error.
    Remote files are copied to a local cache first, since torch loaders want a local path.
    """
    if unpickled and (sha256 is None or len(sha256) != FULL_SHA256):
        raise ValueError(f"{filename} is unpickled on load: pass its whole sha256, not {sha256!r}")
    url = f"{weights_dir.rstrip('/')}/{filename}"
    expected = f" (sha256 {_shown(sha256)})" if sha256 else ""
    fs, path = url_fs(url)
    if not fs.exists(path):
        raise VimError(
            f"{purpose} needs weights file {filename}{expected}; not found at {url}: "
            f"download it on a machine with internet and put it in weights_dir ({weights_dir})"
        )
    if fs.protocol in ("file", "local") or fs.protocol == ("file", "local"):
        local = path
    else:
        cache = Path(os.environ.get("VIM_WEIGHTS_CACHE", Path.home() / ".cache" / "vim" / "weights"))
        cache.mkdir(parents=True, exist_ok=True)
        local = str(cache / filename)
        if not Path(local).exists():
            with atomic_path(local) as tmp:
                fs.get(path, str(tmp))
    if sha256:
        digest = sha256_file(local)
        if digest != sha256 if len(sha256) == FULL_SHA256 else not digest.startswith(sha256):
            raise VimError(
                f"{purpose}: weights file {url} has sha256 {digest}, expected {_shown(sha256)}: "
                "refusing to load it; replace it with the original file"
            )
    return local


def _shown(sha256: str) -> str:
    return sha256 if len(sha256) == FULL_SHA256 else f"starting with {sha256}"


def save_safetensors_with_spec(state: dict, spec: dict, fmt: str, path: str) -> None:
    """Weights plus the JSON spec needed to rebuild the model, in one safetensors file, written atomically."""
    import safetensors.torch

    tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    data = safetensors.torch.save(tensors, metadata={"format": fmt, "config": json.dumps(spec)})
    data = canonical_safetensors(data)
    fs, fpath = url_fs(path)
    if fs.protocol in ("file", "local") or "file" in fs.protocol:
        atomic_write_bytes(fpath, data)
    else:
        with fs.open(fpath, "wb") as f:  # object stores publish a whole object or nothing
            f.write(data)


def canonical_safetensors(data: bytes) -> bytes:
    """The same safetensors file with its metadata keys sorted, so equal weights give equal bytes.

    safetensors writes `__metadata__` from a Rust HashMap, in a random order each call: without this, a
    resumed or repeated run that trains bit-identical weights exports a file with another md5, and DVC
    sees a changed output and reruns every stage below it. Tensors keep their (deterministic) order;
    the header is padded with spaces to 8 bytes, as safetensors pads it.
    """
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + n])
    canon = {}
    if "__metadata__" in header:
        canon["__metadata__"] = dict(sorted(header.pop("__metadata__").items()))
    canon.update(header)
    text = json.dumps(canon, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text + data[8 + n :]


def load_safetensors_with_spec(path: str, fmt: str, what: str) -> tuple[dict, dict]:
    """(state, spec) from a file written by save_safetensors_with_spec; any damage is a one-line VimError."""
    import safetensors.torch

    fs, fpath = url_fs(path)
    if not fs.exists(fpath):
        raise VimError(f"{what} file not found: {path}")
    with fs.open(fpath, "rb") as f:
        data = f.read()
    bad = f"{what} file {path} is truncated or not a safetensors file"
    if len(data) < 8 or 8 + int.from_bytes(data[:8], "little") > len(data):
        raise VimError(bad)
    n = int.from_bytes(data[:8], "little")
    try:
        header = json.loads(data[8 : 8 + n])
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise VimError(bad) from None
    ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"]
    if 8 + n + max(ends, default=0) != len(data):
        raise VimError(f"{what} file {path} is truncated: its tensors do not match its length")
    meta = header.get("__metadata__") or {}
    if meta.get("format") != fmt:
        raise VimError(f"{path} is not a {what} file (format {meta.get('format')!r}, expected {fmt})")
    try:
        spec = json.loads(meta["config"])
        state = safetensors.torch.load(data)
    except Exception as err:
        raise VimError(f"{what} file {path} is unreadable ({type(err).__name__})") from None
    return state, spec


@contextmanager
def atomic_dir(final: str | Path, tmp_name: str | None = None, durable: bool = False) -> Iterator[Path]:
    """Yield a temp dir beside `final`; swap it in only if the block succeeds, else keep the old `final`.

    The one atomic-directory writer (datasets, token shards, classifiers, the outbox, checkpoints).
    `tmp_name` names the temp dir (default `.NAME.tmp`, cleared by the next write of `final`; checkpoints
    pass a name of their own per save). An old `final` is moved aside before the new one is renamed in, so
    a crash leaves the old or the new directory under the final name, never a half-deleted one. With
    `durable`, the files and the temp dir are fsynced before the rename and the parent after it, so the
    directory under its final name survives a power cut whole.
    """
    import shutil

    final = Path(final)
    tmp = final.parent / (tmp_name or f".{final.name}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)  # not mkdtemp, which forces 0700: the umask's usual permissions
    try:
        yield tmp
        if durable:
            fsync_tree(tmp)
        _swap_in(tmp, final)
        if durable:
            fsync_dir(final.parent)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)  # never hides the error that brought us here


def _swap_in(tmp: Path, final: Path) -> None:
    """Rename tmp to final. A directory cannot be renamed onto a non-empty one: the old final is moved
    into a `.old-NAME-*` dir first and deleted after; one left by a crash goes at the next swap."""
    import shutil

    for child in final.parent.iterdir():
        if child.name.startswith(f".old-{final.name}-") and child.is_dir():
            shutil.rmtree(child, ignore_errors=True)
    if not final.exists():
        os.replace(tmp, final)
        return
    stale = Path(tempfile.mkdtemp(prefix=f".old-{final.name}-", dir=final.parent))
    os.replace(final, stale / final.name)
    os.replace(tmp, final)
    shutil.rmtree(stale, ignore_errors=True)


def fsync_tree(root: Path) -> None:
    """fsync every file and directory under root, then root itself."""
    for path in root.rglob("*"):
        if path.is_dir():
            fsync_dir(path)
        elif path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)  # a failure here (EIO, ENOSPC) is the write's failure: it raises
            finally:
                os.close(fd)
    fsync_dir(root)


def fsync_dir(path: Path) -> None:
    """fsync a directory's entries; filesystems that refuse it are let be."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
