"""Image sources, read as streams: the embedded MNIST, an image folder, or tar shards (local or s3://).

Every source yields `Sample`s one at a time; nothing holds the whole dataset in memory except the
embedded MNIST, which is 7.8 MB and ships with the package.
"""

import io
import random
import tarfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import resources
from pathlib import PurePosixPath

import numpy as np

from vim_core.config.data import DataConfig
from vim_core.data.storage import io_error, open_fs
from vim_core.errors import VimError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
MAX_CLS_BYTES = 64  # a .cls member holds one integer label


@dataclass
class Sample:
    key: str  # stable id, used to assign the split
    label: int
    raw: bytes | np.ndarray  # encoded image bytes, or a decoded uint8 array (H, W) / (H, W, C)


@dataclass
class SourceInfo:
    class_names: list[str]
    samples: Iterator[Sample]


def embedded_mnist_path() -> str:
    return str(resources.files("vim_core.data") / "embedded" / "mnist.npz")


def open_source(cfg: DataConfig) -> SourceInfo:
    kind = cfg.source.kind
    if kind == "embedded_mnist":
        return _embedded_mnist(cfg)
    url, fs = cfg.source.url, None
    try:
        fs, root = open_fs(url)
        if kind == "image_folder":
            return _image_folder(fs, root, url, cfg.split_seed, cfg.max_classes)
        return _tar_shards(fs, root, url, cfg.max_classes)
    except VimError:
        raise
    except Exception as err:  # fsspec/s3fs surface many exception types for the same few causes
        raise io_error(url, err, fs) from None


def _embedded_mnist(cfg: DataConfig) -> SourceInfo:
    with np.load(embedded_mnist_path()) as npz:
        images, labels = npz["images"], npz["labels"]
    # The npm package stores digits grouped by class; a seeded permutation makes shards iid.
    order = np.random.default_rng(cfg.split_seed).permutation(len(images))

    def gen() -> Iterator[Sample]:
        for i in order:
            yield Sample(key=f"mnist/{i:05d}", label=int(labels[i]), raw=images[i])

    return SourceInfo(class_names=[str(d) for d in range(10)], samples=gen())


def _require(fs, root: str, url: str) -> None:
    """Fail with the real cause: a missing S3 bucket reads as 'not found' unless the bucket is asked."""
    if fs.exists(root):
        return
    if "s3" in fs.protocol:
        fs.ls(root.split("/")[0])  # raises FileNotFoundError("...bucket does not exist") if it is the bucket
    raise VimError(f"source {url}: not found")


def _image_folder(fs, root: str, url: str, seed: int, max_classes: int) -> SourceInfo:
    _require(fs, root, url)
    if not fs.isdir(root):
        raise VimError(f"source {url}: not a folder (image_folder wants one subfolder per class)")
    classes = sorted(PurePosixPath(p).name for p in fs.ls(root, detail=False) if fs.isdir(p))
    if not classes:
        raise VimError(f"source {url}: empty (no class subfolders)")
    if len(classes) > max_classes:
        raise VimError(
            f"source {url}: {len(classes)} class folders, above data.max_classes={max_classes} "
            f"(e.g. {classes[-1]!r}); raise data.max_classes if that many classes are meant"
        )
    files: list[tuple[str, int]] = []
    for label, name in enumerate(classes):
        found = [
            p
            for p in fs.find(f"{root.rstrip('/')}/{name}")
            if PurePosixPath(p).suffix.lower() in IMAGE_SUFFIXES
        ]
        if not found:
            raise VimError(f"source {url}: class folder {name!r} has no images ({', '.join(IMAGE_SUFFIXES)})")
        files.extend((p, label) for p in sorted(found))
    # Only paths are listed up front; pixels are read one file at a time below.
    random.Random(seed).shuffle(files)

    def gen() -> Iterator[Sample]:
        for path, label in files:
            try:
                with fs.open(path, "rb") as f:
                    raw = f.read()
            except Exception as err:
                raise io_error(url, err, fs, _url_of(fs, path)) from None
            yield Sample(key=path[len(root) :].lstrip("/"), label=label, raw=raw)

    return SourceInfo(class_names=classes, samples=gen())


def _url_of(fs, path: str) -> str:
    """The URL of a path inside fs, as the user would write it (s3://bucket/key)."""
    protocol = fs.protocol[0] if isinstance(fs.protocol, tuple) else fs.protocol
    return path if protocol in ("file", "local") else f"{protocol}://{path}"


def _tar_paths(fs, root: str, url: str) -> tuple[list[str], str]:
    """(tar paths, the root they sit under)."""
    _require(fs, root, url)
    if fs.isfile(root):
        return [root], str(PurePosixPath(root).parent)
    tars = sorted(p for p in fs.find(root) if p.endswith(".tar"))
    if not tars:
        raise VimError(f"source {url}: empty (no .tar shards)")
    return tars, root


@contextmanager
def _open_tar(fs, tar_path: str, url: str) -> Iterator[tarfile.TarFile]:
    """A tar shard as a stream; a storage failure while reading it names the shard."""
    try:
        with fs.open(tar_path, "rb") as f, tarfile.open(fileobj=f, mode="r|*") as tar:
            yield tar
    except VimError:
        raise
    except Exception as err:
        raise io_error(url, err, fs, _url_of(fs, tar_path)) from None


def _tar_shards(fs, root: str, url: str, max_classes: int) -> SourceInfo:
    """Tar members are `CLASS/NAME.png` (class from the folder) or webdataset pairs `KEY.png` + `KEY.cls`."""
    tars, root = _tar_paths(fs, root, url)
    class_names = _tar_class_names(fs, tars, url, max_classes)

    def gen() -> Iterator[Sample]:
        for tar_path in tars:
            # Keys are relative to the source root, so the hash split does not move with the bucket.
            shard = tar_path[len(root) :].lstrip("/")
            with _open_tar(fs, tar_path, url) as tar:
                pending: dict[str, dict] = {}
                for member in tar:
                    if not _regular_member(member, tar_path):
                        continue
                    p = PurePosixPath(member.name)
                    data = tar.extractfile(member).read()
                    if p.suffix.lower() in IMAGE_SUFFIXES and len(p.parts) > 1:
                        yield Sample(
                            key=f"{shard}:{member.name}", label=class_names.index(p.parts[-2]), raw=data
                        )
                        continue
                    stem = str(p.with_suffix(""))
                    entry = pending.setdefault(stem, {})
                    if p.suffix.lower() in IMAGE_SUFFIXES:
                        entry["img"] = data
                    elif p.suffix == ".cls":
                        entry["cls"] = _cls_label(data, member.name, tar_path, max_classes)
                    if "img" in entry and "cls" in entry:
                        yield Sample(key=f"{shard}:{stem}", label=entry["cls"], raw=entry["img"])
                        del pending[stem]
                if pending:
                    raise VimError(
                        f"source {tar_path}: {len(pending)} tar members lack an image or a .cls label"
                    )

    return SourceInfo(class_names=class_names, samples=gen())


def _regular_member(member: tarfile.TarInfo, tar_path: str) -> bool:
    """True for a file to read, False for a directory; a link, device or unsafe name is refused.

    Nothing is extracted to disk, but a shard with such members was not written as a dataset: say so
    rather than read around it.
    """
    name = PurePosixPath(member.name)
    if name.is_absolute() or ".." in name.parts:
        raise VimError(f"source {tar_path}: tar member {member.name!r} has an unsafe path (absolute or ..)")
    if member.issym() or member.islnk():
        raise VimError(
            f"source {tar_path}: tar member {member.name!r} is a link; shards must hold regular files"
        )
    if member.isdir():
        return False
    if not member.isfile():
        raise VimError(f"source {tar_path}: tar member {member.name!r} is not a regular file")
    return True


def _cls_label(data: bytes, member: str, tar_path: str, max_classes: int) -> int:
    """The label in a .cls member; bounded, since the class list has one entry per label up to the largest."""
    if len(data) > MAX_CLS_BYTES:  # a label is a few digits; a bigger member is not one
        raise VimError(f"source {tar_path}: {member}: a .cls member of {len(data)} bytes is not a label")
    text = data.decode("utf-8", errors="replace").strip()
    try:
        label = int(text)
    except ValueError:
        raise VimError(f"source {tar_path}: {member}: label {text[:20]!r} is not an integer") from None
    if label < 0:
        raise VimError(f"source {tar_path}: {member}: label {label} is negative")
    if label >= max_classes:
        raise VimError(
            f"source {tar_path}: {member}: label {label} is not below data.max_classes={max_classes}; "
            "raise data.max_classes if that many classes are meant"
        )
    return label


def _tar_class_names(fs, tars: list[str], url: str, max_classes: int) -> list[str]:
    """Scan member names (headers only) to fix the class list before any pixels are read."""
    folders: set[str] = set()
    max_cls = -1
    for tar_path in tars:
        with _open_tar(fs, tar_path, url) as tar:
            for member in tar:
                if not _regular_member(member, tar_path):
                    continue
                p = PurePosixPath(member.name)
                if p.suffix.lower() in IMAGE_SUFFIXES and len(p.parts) > 1:
                    folders.add(p.parts[-2])
                elif p.suffix == ".cls":
                    if member.size > MAX_CLS_BYTES:  # refused before it is read into memory
                        raise VimError(
                            f"source {tar_path}: {member.name}: a .cls member of {member.size} bytes is not a label"
                        )
                    label = _cls_label(tar.extractfile(member).read(), member.name, tar_path, max_classes)
                    max_cls = max(max_cls, label)
    if folders and max_cls >= 0:
        raise VimError("tar shards mix CLASS/NAME.png members with .cls labels; use one layout")
    if len(folders) > max_classes:
        raise VimError(
            f"tar shards {tars[0]}...: {len(folders)} class folders, above data.max_classes={max_classes}"
        )
    if folders:
        return sorted(folders)
    if max_cls < 0:
        raise VimError(f"tar shards {tars[0]}...: empty (no labelled images)")
    return [str(i) for i in range(max_cls + 1)]


# Pixels an encoded image may declare. Images are decoded whole before they are resized, so a tiny file
# that declares a huge size (a decompression bomb) would take its full size in memory: 8192^2 at most.
MAX_PIXELS = 8192 * 8192


def decode_image(raw: bytes | np.ndarray, channels: int, size: int, fit: str) -> np.ndarray:
    """Decode and normalise one image to uint8 (C, size, size); raises ValueError if it is unusable.

    Accepted and converted: grey, RGB, CMYK, 16-bit grey (scaled to 8 bits, not clipped), palette and
    any transparency (composited over black). Refused: empty files, undecodable or truncated data,
    animated images (which frame would be meant?) and images declaring more than MAX_PIXELS pixels.
    """
    from PIL import Image, UnidentifiedImageError

    if isinstance(raw, np.ndarray):
        img = Image.fromarray(raw)
    else:
        if len(raw) == 0:
            raise ValueError("empty file (0 bytes)")
        try:
            with warnings.catch_warnings():  # PIL only warns below 2x its own limit; ours refuses below
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                img = Image.open(io.BytesIO(raw))
            w, h = img.size
            if w * h > MAX_PIXELS:
                raise ValueError(
                    f"declares {w}x{h} pixels, above the {MAX_PIXELS} limit (a decompression bomb?)"
                )
            # A camera JPEG often holds a preview as a second picture (MPO): its first frame is the photo.
            if getattr(img, "n_frames", 1) > 1 and img.format != "MPO":
                raise ValueError(f"animated image with {img.n_frames} frames; give one frame per file")
            img.load()
        except (UnidentifiedImageError, OSError, SyntaxError, Image.DecompressionBombError) as err:
            raise ValueError(" ".join(str(err).split()) or type(err).__name__) from None
    img = _to_8bit(img)
    if img.mode in ("RGBA", "LA", "PA", "P") or "transparency" in img.info:
        img = img.convert("RGBA")
        background = Image.new("RGBA", img.size, (0, 0, 0, 255))
        img = Image.alpha_composite(background, img)
    img = img.convert("L" if channels == 1 else "RGB")
    img = _fit(img, size, fit)
    arr = np.asarray(img, dtype=np.uint8)
    return arr[None] if channels == 1 else arr.transpose(2, 0, 1).copy()


def _to_8bit(img):
    """16-bit grey (PNG) to 8 bits by scaling; PIL's own convert("L") clips everything above 255 to white."""
    from PIL import Image

    if img.mode not in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        return img
    arr = np.asarray(img).astype(np.int64)
    if img.mode == "I" and (arr.min() < 0 or arr.max() > 65535):
        raise ValueError(f"32-bit integer pixels (range {arr.min()}..{arr.max()}) are not supported")
    return Image.fromarray(np.round(arr / 257.0).astype(np.uint8))


def _fit(img, size: int, fit: str):
    """resize: squash to size x size; center_crop: central square, then resize; pad: fit inside, then pad."""
    from PIL import Image

    w, h = img.size
    if (w, h) == (size, size):
        return img
    if fit == "pad":
        scale = min(1.0, size / max(w, h))
        if scale < 1.0:
            w, h = max(1, round(w * scale)), max(1, round(h * scale))
            img = img.resize((w, h), Image.Resampling.BICUBIC)
        canvas = Image.new(img.mode, (size, size), 0)
        canvas.paste(img, ((size - w) // 2, (size - h) // 2))
        return canvas
    if fit == "center_crop":
        side = min(w, h)
        left, top = (w - side) // 2, (h - side) // 2
        img = img.crop((left, top, left + side, top + side))
    return img.resize((size, size), Image.Resampling.BICUBIC)
