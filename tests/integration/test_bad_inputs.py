"""Bad inputs, one kind per case: each gets a one-line cause and a non-zero exit, and leaves nothing
half-written. Every file is made here, in tmp; nothing is downloaded.

The `vim` CLI cases run `vim_core.cli.main` in-process (the console script's entry point; a few also run
through the installed `vim` script, below) and check the exit code, that stderr is exactly one
`error: ...` line, and that the working folder holds afterwards exactly what it held before. The data
cases (tar shards, sources) call vim_core's prepare(), which the prepare_data stage runs: its one-line
VimError is what the stage CLI prints before exiting 1 (tests/flows/test_stage_flows.py), and the previous
prepared dataset must stay as it was. Some odd images are accepted rather than refused: 16-bit grey,
CMYK JPEG and transparency are converted, and those cases check the pixels.

Each case is marked `bad_input`, so reports/reliability.json lists it by name (tests/reliability.py).
"""

import io
import json
import os
import shutil
import struct
import subprocess
import sys
import tarfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from tests.vim_core.transformer.test_transformer_stage import stage2_params
from vim_core.cli import main as vim_main
from vim_core.config import parse_params
from vim_core.data.prepare import prepare
from vim_core.data.sources import decode_image
from vim_core.errors import VimError
from vim_core.io import save_safetensors_with_spec, sha256_file
from vim_core.tokenizer.export import FORMAT as TOKENIZER_FORMAT
from vim_core.tokenizer.export import save_tokenizer
from vim_core.tokenizer.model import build_tokenizer
from vim_core.transformer.export import FORMAT as TRANSFORMER_FORMAT
from vim_core.transformer.export import save_transformer
from vim_core.transformer.gpt import VIM

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.bad_input


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """Random micro tokenizer (32 px, 1 channel, 64 codes, 8x8 tokens) and class-conditional VIM files."""
    tmp = tmp_path_factory.mktemp("models")
    params = parse_params(stage2_params(tmp))
    torch.manual_seed(0)
    tok = build_tokenizer(params.tokenizer.model, 32, 1)
    save_tokenizer(tok, params.tokenizer.model, str(tmp / "tokenizer.safetensors"))
    vim = VIM(params.transformer.resolved_model(), tok.codebook_size, (8, 8))
    extra = {"tokenizer_sha256": sha256_file(tmp / "tokenizer.safetensors")}
    save_transformer(vim, str(tmp / "transformer.safetensors"), extra=extra)
    return {"tokenizer": tmp / "tokenizer.safetensors", "transformer": tmp / "transformer.safetensors"}


# ---------------------------------------------------------------- helpers


def snapshot(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_size for p in sorted(root.rglob("*")) if p.is_file()}


def run_cli(argv: list[str], cwd: Path, capsys) -> tuple[int, list[str]]:
    """vim_core.cli.main in cwd: (exit code, stderr lines)."""
    here = os.getcwd()
    os.chdir(cwd)
    try:
        code = vim_main(argv)
    finally:
        os.chdir(here)
    return code, capsys.readouterr().err.strip().splitlines()


def assert_refused(code: int, lines: list[str], says: str) -> None:
    assert code != 0
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    assert says in lines[0], lines[0]


def png_bytes(array: np.ndarray, **save) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG", **save)
    return buf.getvalue()


def _chunk(kind: bytes, data: bytes) -> bytes:
    return (
        struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    )


def declared_png(width: int, height: int) -> bytes:
    """A valid PNG header declaring width x height grey pixels, followed by a few bytes of data: a bomb."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", ihdr)
        + _chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + _chunk(b"IEND", b"")
    )


def animated_gif() -> bytes:
    from PIL import Image

    frames = [Image.new("L", (8, 8), v) for v in (0, 128, 255)]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:])
    return buf.getvalue()


DIGIT = np.zeros((28, 28), np.uint8)
DIGIT[8:20, 12:16] = 255

# ---------------------------------------------------------------- params: `vim check-params`

FULL = yaml.safe_load((REPO / "params.yaml").read_text())


def _without(*keys: str) -> dict:
    raw = json.loads(json.dumps(FULL))
    for key in keys:
        *parents, leaf = key.split(".")
        node = raw
        for part in parents:
            node = node[part]
        del node[leaf]
    return raw


def _with(key: str, value) -> dict:
    raw = json.loads(json.dumps(FULL))
    *parents, leaf = key.split(".")
    node = raw
    for part in parents:
        node = node[part]
    node[leaf] = value
    return raw


PARAMS_CASES = {
    "params_empty_file": ("", "the file is empty"),
    "params_section_missing": (yaml.safe_dump(_without("evaluate")), "evaluate: missing"),
    "params_subsection_missing": (
        yaml.safe_dump(_without("transformer.train")),
        "transformer.train: missing",
    ),
    "params_not_yaml": ("data: [unclosed\n", "not valid YAML at line 2"),
    "params_root_not_mapping": ("- 1\n- 2\n", "<root> = list: must be a mapping"),
    "params_unknown_key": (
        yaml.safe_dump(_with("data.image_sise", 32)),
        "data.image_sise = 32: Extra inputs",
    ),
    "params_wrong_type": (yaml.safe_dump(_with("data.image_size", "big")), "data.image_size = 'big'"),
    "params_out_of_range": (yaml.safe_dump(_with("data.test_fraction", 1.5)), "data.test_fraction = 1.5"),
    "params_unknown_timezone": (
        yaml.safe_dump(_with("schedule", {"cron": "0 3 * * 1", "timezone": "Mars/Olympus"})),
        "schedule.timezone = 'Mars/Olympus': unknown IANA time zone",
    ),
    "params_bad_cron": (
        yaml.safe_dump(_with("schedule", {"cron": "every monday", "timezone": "UTC"})),
        "must have 5 fields",
    ),
    "params_unknown_vit_preset": (
        yaml.safe_dump(_with("tokenizer.model.encoder", "huge")),
        "tokenizer.model.encoder = 'huge': unknown ViT preset",
    ),
    "params_unknown_vim_preset": (
        yaml.safe_dump(_with("transformer.model", "vim-huge")),
        "transformer.model = 'vim-huge': unknown VIM preset",
    ),
}


@pytest.mark.parametrize("case", list(PARAMS_CASES))
def test_bad_params(case, tmp_path, capsys):
    text, says = PARAMS_CASES[case]
    (tmp_path / "params.yaml").write_text(text)
    shutil.copy(REPO / "dvc.yaml", tmp_path / "dvc.yaml")
    before = snapshot(tmp_path)
    code, lines = run_cli(["check-params", "params.yaml"], tmp_path, capsys)
    if case in ("params_section_missing", "params_subsection_missing"):
        assert code == 2 and len(lines) >= 1 and all(says.split(":")[0] in line for line in lines), lines
        assert len(lines) == len({line for line in lines})  # one line per problem, no repeats
    else:
        assert_refused(code, lines, says)
    assert snapshot(tmp_path) == before


def test_params_file_not_found(tmp_path, capsys):
    code, lines = run_cli(["check-params", "nowhere.yaml"], tmp_path, capsys)
    assert_refused(code, lines, "nowhere.yaml: file not found")
    assert snapshot(tmp_path) == {}


# ---------------------------------------------------------------- images: `vim encode`

IMAGE_CASES = {
    "image_zero_bytes": (lambda: b"", "empty file (0 bytes)"),
    "image_decompression_bomb": (lambda: declared_png(100_000, 100_000), "decompression bomb"),
    "image_declares_above_cap": (lambda: declared_png(12_000, 12_000), "above the 67108864 limit"),
    "image_truncated_png": (lambda: png_bytes(np.full((64, 64), 7, np.uint8))[:60], "not a readable image"),
    "image_not_an_image": (lambda: b"hello, I am text\n" * 10, "not a readable image"),
    "image_animated_gif": (animated_gif, "animated image with 3 frames"),
}


@pytest.mark.parametrize("case", list(IMAGE_CASES))
def test_bad_image_encode(case, tmp_path, models, capsys):
    make, says = IMAGE_CASES[case]
    (tmp_path / "in.img").write_bytes(make())
    before = snapshot(tmp_path)
    argv = ["encode", "in.img", "--tokenizer", str(models["tokenizer"]), "--out", "tokens.npz"]
    code, lines = run_cli(argv, tmp_path, capsys)
    assert_refused(code, lines, says)
    assert lines[0].startswith("error: in.img: ")
    assert snapshot(tmp_path) == before  # no tokens.npz, no temp file


@pytest.mark.parametrize("case", ["image_missing_file", "image_is_a_directory"])
def test_unreadable_image_path(case, tmp_path, models, capsys):
    if case == "image_is_a_directory":
        (tmp_path / "in.img").mkdir()
    before = snapshot(tmp_path)
    argv = ["encode", "in.img", "--tokenizer", str(models["tokenizer"]), "--out", "tokens.npz"]
    code, lines = run_cli(argv, tmp_path, capsys)
    assert_refused(code, lines, "in.img: cannot read")
    assert snapshot(tmp_path) == before and not (tmp_path / "tokens.npz").exists()


def test_image_16bit_png_is_scaled_not_clipped():
    """Accepted: 16-bit grey becomes round(v / 257); PIL's own convert("L") would clip all above 255."""
    values = (np.arange(32 * 32, dtype=np.uint32).reshape(32, 32) * 64).astype(np.uint16)
    out = decode_image(png_bytes(values), 1, 32, "pad")
    np.testing.assert_array_equal(out[0], np.round(values / 257).astype(np.uint8))
    assert out[0, 0, 16] == 4  # 1024 / 257; clipping would make it 255


def test_image_cmyk_jpeg_is_converted():
    """Accepted: CMYK JPEG to RGB (pure cyan stays cyan) and to grey."""
    from PIL import Image

    buf = io.BytesIO()
    Image.new("CMYK", (32, 32), (255, 0, 0, 0)).save(buf, format="JPEG", quality=95)
    rgb = decode_image(buf.getvalue(), 3, 32, "pad")
    assert rgb.shape == (3, 32, 32)
    np.testing.assert_allclose(rgb.reshape(3, -1).mean(1), [0, 255, 255], atol=3)
    grey = decode_image(buf.getvalue(), 1, 32, "pad")
    assert abs(float(grey.mean()) - 179) < 3  # L = 0.587 * 255 + 0.114 * 255


def test_image_palette_png_with_transparency_is_composited():
    """Accepted: a palette PNG's transparent index becomes black background, opaque entries keep colour."""
    from PIL import Image

    img = Image.new("P", (32, 32), 0)
    img.putpalette([255, 255, 255, 200, 100, 50] + [0] * 762)  # index 0 white (transparent), 1 orange
    for x in range(16):
        for y in range(32):
            img.putpixel((x, y), 1)
    buf = io.BytesIO()
    img.save(buf, format="PNG", transparency=0)
    rgb = decode_image(buf.getvalue(), 3, 32, "pad")
    assert tuple(rgb[:, 0, 0]) == (200, 100, 50) and tuple(rgb[:, 0, 31]) == (0, 0, 0)
    grey = decode_image(buf.getvalue(), 1, 32, "pad")
    assert grey[0, 0, 0] == 124 and grey[0, 0, 31] == 0  # L of (200, 100, 50); transparent white is black


def test_image_mpo_camera_jpeg_gives_its_first_picture():
    """Accepted: a camera JPEG holding a second picture (MPO) is not an animation; the first is the photo."""
    from PIL import Image

    buf = io.BytesIO()
    first, preview = Image.new("RGB", (32, 32), (250, 250, 250)), Image.new("RGB", (32, 32), (0, 0, 0))
    first.save(buf, format="MPO", save_all=True, append_images=[preview])
    assert Image.open(io.BytesIO(buf.getvalue())).n_frames == 2
    out = decode_image(buf.getvalue(), 1, 32, "pad")
    assert abs(float(out.mean()) - 250) < 3


def test_image_grey_png_with_transparent_value_is_composited():
    """Accepted: a grey PNG whose tRNS marks value 7 transparent: those pixels become background (0)."""
    arr = np.full((32, 32), 7, np.uint8)
    arr[:, :8] = 200
    out = decode_image(png_bytes(arr, transparency=7), 1, 32, "pad")
    assert out[0, 0, 0] == 200 and out[0, 0, 31] == 0


# ---------------------------------------------------------------- tar shards and sources: prepare_data


def _tar(path: Path, members: list[tuple[str, bytes | tarfile.TarInfo]]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, payload in members:
            if isinstance(payload, tarfile.TarInfo):
                tar.addfile(payload)
                continue
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))


def _link(name: str, target: str, kind: bytes) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, target
    return info


def _device(name: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = tarfile.CHRTYPE
    return info


GOOD = png_bytes(DIGIT)
TAR_CASES = {
    "tar_member_parent_path": ([("0/a.png", GOOD), ("../x.png", GOOD)], "'../x.png' has an unsafe path"),
    "tar_member_absolute_path": ([("0/a.png", GOOD), ("/abs.png", GOOD)], "'/abs.png' has an unsafe path"),
    "tar_member_nested_parent": ([("0/../../x.png", GOOD)], "has an unsafe path"),
    "tar_symlink_member": (
        [("0/a.png", GOOD), ("0/b.png", _link("0/b.png", "/etc/passwd", tarfile.SYMTYPE))],
        "'0/b.png' is a link",
    ),
    "tar_hardlink_member": (
        [("0/a.png", GOOD), ("0/b.png", _link("0/b.png", "0/a.png", tarfile.LNKTYPE))],
        "'0/b.png' is a link",
    ),
    "tar_device_member": ([("0/a.png", GOOD), ("0/dev.png", _device("0/dev.png"))], "not a regular file"),
    "tar_cls_not_integer": (
        [("k1.png", GOOD), ("k1.cls", b"seven\n")],
        "k1.cls: label 'seven' is not an integer",
    ),
    "tar_cls_negative": ([("k1.png", GOOD), ("k1.cls", b"-3\n")], "k1.cls: label -3 is negative"),
    # One label sizes the class list (0..label): without a bound, 2000000000 builds two billion names.
    "tar_cls_two_billion": (
        [("k1.png", GOOD), ("k1.cls", b"2000000000\n")],
        "k1.cls: label 2000000000 is not below data.max_classes=10000",
    ),
    "tar_cls_above_max_classes": (
        [("k1.png", GOOD), ("k1.cls", b"0"), ("k2.png", GOOD), ("k2.cls", b"20000")],
        "k2.cls: label 20000 is not below data.max_classes=10000",
    ),
    "tar_cls_huge_member": (
        [("k1.png", GOOD), ("k1.cls", b"1" * 100_000)],
        "k1.cls: a .cls member of 100000",
    ),
    "tar_image_without_label": (
        [("k1.png", GOOD), ("k1.cls", b"0"), ("k2.png", GOOD)],
        "lack an image or a .cls",
    ),
    "tar_mixed_layouts": ([("0/a.png", GOOD), ("k1.png", GOOD), ("k1.cls", b"1")], "mix CLASS/NAME.png"),
}


@pytest.fixture
def previous(tmp_path) -> Path:
    """A prepared dataset from an earlier run, which a failed prepare must leave exactly as it was."""
    out = tmp_path / "prepared"
    out.mkdir()
    (out / "manifest.json").write_text('{"earlier": true}')
    return out


def _prepare_refuses(tmp_path: Path, previous: Path, source: dict, says: str, **data) -> None:
    cfg = parse_params({"data": {"source": source, "out_dir": str(previous), "channels": 1, **data}}).data
    before = snapshot(tmp_path)
    with pytest.raises(VimError) as err:
        prepare(cfg)
    message = str(err.value)
    assert "\n" not in message and says in message, message
    assert snapshot(tmp_path) == before  # the old dataset is intact, no temp dir is left
    assert (previous / "manifest.json").read_text() == '{"earlier": true}'


@pytest.mark.parametrize("case", list(TAR_CASES))
def test_bad_tar_shard(case, tmp_path, previous):
    members, says = TAR_CASES[case]
    (tmp_path / "shards").mkdir()
    _tar(tmp_path / "shards" / "s0.tar", members)
    _prepare_refuses(tmp_path, previous, {"kind": "tar_shards", "url": str(tmp_path / "shards")}, says)


def test_tar_shard_not_a_tar(tmp_path, previous):
    (tmp_path / "shards").mkdir()
    (tmp_path / "shards" / "s0.tar").write_bytes(os.urandom(3000))
    _prepare_refuses(tmp_path, previous, {"kind": "tar_shards", "url": str(tmp_path / "shards")}, "source ")


def _folder(root: Path, files: dict[str, bytes]) -> Path:
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return root


def test_folder_classes_above_max_classes(tmp_path, previous):
    """Folder sources hold to the same bound as .cls labels: one class per subfolder."""
    src = _folder(tmp_path / "src", {f"{c}/a.png": GOOD for c in "abcd"})
    says = "4 class folders, above data.max_classes=3"
    _prepare_refuses(tmp_path, previous, {"kind": "image_folder", "url": str(src)}, says, max_classes=3)


def test_tar_class_folders_above_max_classes(tmp_path, previous):
    (tmp_path / "shards").mkdir()
    _tar(tmp_path / "shards" / "s0.tar", [(f"{c}/a.png", GOOD) for c in "abc"])
    source = {"kind": "tar_shards", "url": str(tmp_path / "shards")}
    _prepare_refuses(tmp_path, previous, source, "3 class folders, above data.max_classes=2", max_classes=2)


SOURCE_CASES = {
    "source_missing_folder": (lambda t: t / "nowhere", "not found"),
    "source_folder_is_a_file": (lambda t: _folder(t, {"data.png": GOOD}) / "data.png", "not a folder"),
    "source_folder_without_classes": (
        lambda t: _folder(t, {"loose.png": GOOD}),
        "empty (no class subfolders)",
    ),
    "source_class_without_images": (
        lambda t: _folder(t / "src", {"0/a.png": GOOD, "1/readme.txt": b"hi"}),
        "class folder '1' has no images",
    ),
    "source_all_images_unreadable": (
        lambda t: _folder(t / "src", {"0/a.png": b"", "0/b.png": b"junk", "1/c.png": GOOD[:40]}),
        "3 of 3 images unreadable",
    ),
}


@pytest.mark.parametrize("case", list(SOURCE_CASES))
def test_bad_image_folder(case, tmp_path, previous):
    make, says = SOURCE_CASES[case]
    (tmp_path / "in").mkdir()
    url = make(tmp_path / "in")
    _prepare_refuses(tmp_path, previous, {"kind": "image_folder", "url": str(url)}, says)


# ---------------------------------------------------------------- tokens and sampling: `vim decode | sample`


def _tokens(path: Path, tokens) -> None:
    with open(path, "wb") as f:
        np.savez(f, tokens=tokens)


DECODE_CASES = {
    "decode_token_id_at_codebook_size": (
        lambda p: _tokens(p, np.full((2, 64), 64, np.uint16)),
        "token ids 64..64 outside this tokenizer's codebook 0..63",
    ),
    "decode_token_id_negative": (
        lambda p: _tokens(p, np.full((2, 64), -1, np.int64)),
        "token ids -1..-1 outside",
    ),
    "decode_wrong_length": (lambda p: _tokens(p, np.zeros((2, 63), np.uint16)), "do not fit this tokenizer"),
    "decode_one_dimensional": (lambda p: _tokens(p, np.zeros(64, np.uint16)), "do not fit this tokenizer"),
    "decode_float_tokens": (lambda p: _tokens(p, np.zeros((2, 64), np.float32)), "must be integers"),
    "decode_npz_without_tokens": (
        lambda p: p.write_bytes(_npz(images=np.zeros(3))),
        "not a tokens file written by `vim encode`",
    ),
    "decode_not_an_npz": (lambda p: p.write_bytes(b"PK\x03\x04 broken"), "not a tokens file"),
}


def _npz(**arrays) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


@pytest.mark.parametrize("case", list(DECODE_CASES))
def test_bad_tokens_decode(case, tmp_path, models, capsys):
    make, says = DECODE_CASES[case]
    make(tmp_path / "tokens.npz")
    before = snapshot(tmp_path)
    argv = ["decode", "tokens.npz", "--tokenizer", str(models["tokenizer"]), "--out", "decoded"]
    code, lines = run_cli(argv, tmp_path, capsys)
    assert_refused(code, lines, says)
    assert snapshot(tmp_path) == before and not (tmp_path / "decoded").exists()


SAMPLE_CASES = {
    "sample_class_at_num_classes": (["--class", "10"], "--class 10 is outside 0..9"),
    "sample_class_negative": (["--class", "-1"], "--class -1 is outside 0..9"),
    "sample_zero_samples": (["-n", "0"], "-n 0: the number of samples must be >= 1"),
    "sample_negative_temperature": (["--temperature", "-1"], "temperature must be >= 0"),
}


@pytest.mark.parametrize("case", list(SAMPLE_CASES))
def test_bad_sample_request(case, tmp_path, models, capsys):
    extra, says = SAMPLE_CASES[case]
    argv = ["sample", "--model", str(models["transformer"]), "--tokenizer", str(models["tokenizer"])]
    code, lines = run_cli([*argv, "-n", "2", *extra, "--out", "grid.png"], tmp_path, capsys)
    assert_refused(code, lines, says)
    assert snapshot(tmp_path) == {}


def test_sample_model_of_another_tokenizer(tmp_path, models, capsys):
    other = tmp_path / "other.safetensors"
    params = parse_params(stage2_params(tmp_path))
    torch.manual_seed(1)
    save_tokenizer(build_tokenizer(params.tokenizer.model, 32, 1), params.tokenizer.model, str(other))
    before = snapshot(tmp_path)
    argv = ["sample", "--model", str(models["transformer"]), "--tokenizer", str(other), "--out", "grid.png"]
    code, lines = run_cli(argv, tmp_path, capsys)
    assert_refused(code, lines, "was trained on tokens of another tokenizer")
    assert snapshot(tmp_path) == before


# ---------------------------------------------------------------- model files


def _retensored(src: Path, dst: Path, fmt: str, change) -> None:
    """dst: src's weights and spec with `change(state)` applied, as a well-formed safetensors file."""
    import safetensors.torch

    data = src.read_bytes()
    header = json.loads(data[8 : 8 + int.from_bytes(data[:8], "little")])
    state = safetensors.torch.load(data)
    change(state)
    save_safetensors_with_spec(state, json.loads(header["__metadata__"]["config"]), fmt, str(dst))


def _shrink_first(state: dict) -> None:
    name = next(k for k, v in state.items() if v.ndim == 2)
    state[name] = state[name][:, :-1].contiguous()


MODEL_CASES = {
    "tokenizer_safetensors_wrong_shapes": (
        "tokenizer",
        lambda m, d: _retensored(m["tokenizer"], d, TOKENIZER_FORMAT, _shrink_first),
        "cannot load weights from",
    ),
    "tokenizer_not_safetensors": ("tokenizer", lambda m, d: d.write_bytes(os.urandom(512)), "tokenizer file"),
    "tokenizer_truncated": (
        "tokenizer",
        lambda m, d: d.write_bytes(m["tokenizer"].read_bytes()[:-100]),
        "is truncated",
    ),
    "tokenizer_is_a_transformer_file": (
        "tokenizer",
        lambda m, d: shutil.copy(m["transformer"], d),
        "is not a tokenizer file (format 'vim-transformer/1'",
    ),
    "transformer_safetensors_wrong_shapes": (
        "transformer",
        lambda m, d: _retensored(m["transformer"], d, TRANSFORMER_FORMAT, _shrink_first),
        "does not match its spec",
    ),
}


@pytest.mark.parametrize("case", list(MODEL_CASES))
def test_bad_model_file(case, tmp_path, models, capsys):
    which, make, says = MODEL_CASES[case]
    make(models, tmp_path / "bad.safetensors")
    files = {**models, which: tmp_path / "bad.safetensors"}
    before = snapshot(tmp_path)
    if which == "tokenizer":
        (tmp_path / "in.png").write_bytes(GOOD)
        before = snapshot(tmp_path)
        argv = ["encode", "in.png", "--tokenizer", str(files["tokenizer"]), "--out", "tokens.npz"]
    else:
        argv = ["sample", "--model", str(files["transformer"]), "--tokenizer", str(files["tokenizer"])]
        argv += ["-n", "2", "--out", "grid.png"]
    code, lines = run_cli(argv, tmp_path, capsys)
    assert_refused(code, lines, says)
    assert snapshot(tmp_path) == before


# ---------------------------------------------------------------- training checkpoints


class TouchOnUnpickle:
    """Unpickling this opens (creates) `marker`: evidence that someone ran the pickle's code."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _checkpoint(tmp_path: Path) -> tuple[Path, torch.nn.Module]:
    from vim_core.train.checkpoint import save_checkpoint

    model = torch.nn.Linear(4, 3)
    return save_checkpoint(tmp_path / "ckpt", 5, {"model": model}), model


def _reseal(ckpt: Path) -> None:
    """Rewrite meta.json's sizes and checksums, so a swapped file passes verification and reaches the loader."""
    meta = json.loads((ckpt / "meta.json").read_text())
    for name in meta["files"]:
        meta["files"][name] = {"sha256": sha256_file(ckpt / name), "bytes": (ckpt / name).stat().st_size}
    (ckpt / "meta.json").write_text(json.dumps(meta))


def test_checkpoint_state_pt_with_pickle_payload_is_refused_unrun(tmp_path):
    from vim_core.train.checkpoint import latest_checkpoint, load_checkpoint

    ckpt, model = _checkpoint(tmp_path)
    marker = tmp_path / "pwned"
    torch.save({"step": 5, "extra": TouchOnUnpickle(marker)}, ckpt / "state.pt")
    _reseal(ckpt)
    assert latest_checkpoint(tmp_path / "ckpt") == ckpt  # intact by its checksums: only loading can tell
    with pytest.raises(VimError) as err:
        load_checkpoint(ckpt, {"model": model})
    assert "\n" not in str(err.value) and "state.pt: unreadable" in str(err.value)
    assert not marker.exists()  # refused, and the payload never ran


CHECKPOINT_CASES = {
    "checkpoint_truncated_weights": ("model.safetensors", "bytes, expected"),
    "checkpoint_meta_json_corrupt": ("meta.json", "corrupt checkpoint metadata"),
    "checkpoint_state_missing": ("state.pt", "missing from the checkpoint"),
}


@pytest.mark.parametrize("case", list(CHECKPOINT_CASES))
def test_damaged_checkpoint(case, tmp_path):
    from vim_core.train.checkpoint import load_checkpoint

    ckpt, model = _checkpoint(tmp_path)
    target, says = CHECKPOINT_CASES[case]
    if case == "checkpoint_state_missing":
        (ckpt / target).unlink()
    else:
        data = (ckpt / target).read_bytes()
        (ckpt / target).write_bytes(data[: len(data) // 2])
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        model.weight.zero_()
    with pytest.raises(VimError) as err:
        load_checkpoint(ckpt, {"model": model})
    assert "\n" not in str(err.value) and says in str(err.value), str(err.value)
    assert torch.equal(model.weight, torch.zeros_like(weights["weight"]))  # nothing half-loaded


# ---------------------------------------------------------------- the installed `vim` console script

SCRIPT_CASES = {
    "cli_script_check_params_empty": (
        lambda t, m: (t / "p.yaml").write_text("") and None,
        ["check-params", "p.yaml"],
        2,
    ),
    "cli_script_decode_out_of_range": (
        lambda t, m: _tokens(t / "tokens.npz", np.full((1, 64), 999, np.uint16)),
        ["decode", "tokens.npz", "--tokenizer", "{tokenizer}", "--out", "decoded"],
        1,
    ),
    "cli_script_sample_class_out_of_range": (
        lambda t, m: None,
        [
            "sample",
            "--model",
            "{transformer}",
            "--tokenizer",
            "{tokenizer}",
            "--class",
            "12",
            "--out",
            "g.png",
        ],
        1,
    ),
    "cli_script_encode_zero_byte_image": (
        lambda t, m: (t / "empty.png").write_bytes(b"") and None,
        ["encode", "empty.png", "--tokenizer", "{tokenizer}", "--out", "tokens.npz"],
        1,
    ),
}


@pytest.mark.parametrize("case", list(SCRIPT_CASES))
def test_vim_console_script(case, tmp_path, models):
    make, argv, exit_code = SCRIPT_CASES[case]
    make(tmp_path, models)
    before = snapshot(tmp_path)
    script = Path(sys.executable).parent / "vim"
    cmd = [str(script)] if script.exists() else [sys.executable, "-m", "vim_core.cli"]
    args = [a.format(**{k: str(v) for k, v in models.items()}) for a in argv]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    res = subprocess.run([*cmd, *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    lines = res.stderr.strip().splitlines()
    assert res.returncode == exit_code, res.stderr
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in res.stderr, res.stderr
    assert snapshot(tmp_path) == before
