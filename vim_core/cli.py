"""The `vim` command: check-params, train-tokenizer, encode, decode, sample."""

import argparse
import sys
from pathlib import Path

from vim_core.errors import ConfigError, VimError


def _check_params(args: argparse.Namespace) -> int:
    from vim_core.config import check_params_file

    check_params_file(args.path, _dvc_yaml_for(args.path, args.dvc_yaml))
    print(f"{args.path}: ok")
    return 0


def _dvc_yaml_for(params_path: str, given: str | None) -> Path | None:
    """The dvc.yaml whose stages read the params file: --dvc-yaml, else the one beside it, else ./dvc.yaml."""
    if given:
        if not Path(given).is_file():
            raise VimError(f"{given}: file not found")
        return Path(given)
    for candidate in (Path(params_path).parent / "dvc.yaml", Path("dvc.yaml")):
        if candidate.is_file():
            return candidate
    return None


def _train_tokenizer(args: argparse.Namespace) -> int:
    """Also the torchrun entry: `torchrun --nproc_per_node=N -m vim_core.cli train-tokenizer`."""
    import json

    from vim_core.config import load_params
    from vim_core.io import atomic_write_text
    from vim_core.train import distributed as vdist
    from vim_core.train.tokenizer_trainer import train_tokenizer

    params = load_params(args.params)
    run = train_tokenizer(params.tokenizer, params.data.out_dir, seed=params.seed, plots_dir=args.plots)
    if vdist.is_main() and args.metrics:
        atomic_write_text(args.metrics, json.dumps(run.metrics, indent=2, sort_keys=True) + "\n")
    vdist.cleanup()
    return 0


def _pretrain_transformer(args: argparse.Namespace) -> int:
    """Also the torchrun entry: `torchrun --nproc_per_node=N -m vim_core.cli pretrain-transformer`."""
    import json

    from vim_core.config import load_params
    from vim_core.io import atomic_write_text
    from vim_core.train import distributed as vdist
    from vim_core.train.transformer_trainer import train_with_uncond_copy

    params = load_params(args.params)
    run = train_with_uncond_copy(params.transformer, seed=params.seed, plots_dir=args.plots)
    if vdist.is_main() and args.metrics:
        atomic_write_text(args.metrics, json.dumps(run.metrics, indent=2, sort_keys=True) + "\n")
    vdist.cleanup()
    return 0


def _encode(args: argparse.Namespace) -> int:
    import numpy as np
    from tqdm import tqdm

    from vim_core.data.sources import decode_image
    from vim_core.io import atomic_path, sha256_file
    from vim_core.tokenizer.export import load_tokenizer

    tok = load_tokenizer(args.tokenizer).eval()
    arrays = []
    for path in tqdm(args.images, desc="read", unit="img", disable=len(args.images) < 64):
        try:
            with open(path, "rb") as f:
                arrays.append(decode_image(f.read(), tok.channels, tok.image_size, args.fit))
        except OSError as err:
            raise VimError(f"{path}: cannot read ({err.strerror})") from None
        except ValueError as err:
            raise VimError(f"{path}: not a readable image ({err})") from None
    out = tok.encode_uint8(np.stack(arrays), args.batch_size).numpy().astype(np.uint16)
    with atomic_path(args.out, suffix=".npz") as tmp, open(tmp, "wb") as f:
        np.savez(
            f,
            tokens=out,
            grid=np.asarray(tok.grid_size),
            files=np.asarray(args.images),
            tokenizer_sha256=np.asarray(sha256_file(args.tokenizer)),
        )
    print(f"{args.out}: {out.shape[0]} images x {out.shape[1]} tokens")
    return 0


def _load_tokens(path: str):
    import zipfile

    import numpy as np

    try:
        with np.load(path) as npz:
            return npz["tokens"]
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as err:
        raise VimError(f"{path}: not a tokens file written by `vim encode` ({type(err).__name__})") from None


def _decode(args: argparse.Namespace) -> int:
    import torch

    from vim_core.tokenizer.export import load_tokenizer

    tok = load_tokenizer(args.tokenizer).eval()
    raw = _load_tokens(args.tokens)
    if raw.dtype.kind not in "iu":
        raise VimError(f"{args.tokens}: token ids must be integers, not {raw.dtype}")
    tokens = torch.from_numpy(raw.astype("int64"))
    if tokens.ndim != 2 or tokens.shape[1] != tok.num_tokens or not len(tokens):
        raise VimError(
            f"{args.tokens}: tokens of shape {tuple(tokens.shape)} do not fit this tokenizer "
            f"(N images x {tok.num_tokens} tokens)"
        )
    low, high = int(tokens.min()), int(tokens.max())
    if low < 0 or high >= tok.codebook_size:
        raise VimError(
            f"{args.tokens}: token ids {low}..{high} outside this tokenizer's codebook 0..{tok.codebook_size - 1}"
        )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for i, img in enumerate(tok.decode_uint8(tokens, args.batch_size)):
        _save_png(img, out / f"{i:06d}.png")
    print(f"{out}: {len(tokens)} images")
    return 0


def _sample(args: argparse.Namespace) -> int:
    import torch

    from vim_core.eval.grids import image_grid
    from vim_core.io import sha256_file
    from vim_core.tokenizer.export import load_tokenizer
    from vim_core.transformer.export import load_transformer
    from vim_core.transformer.sampling import sample

    if args.n < 1:
        raise VimError(f"-n {args.n}: the number of samples must be >= 1")
    tok = load_tokenizer(args.tokenizer).eval()
    model, extra = load_transformer(args.model)
    expected = extra.get("tokenizer_sha256")
    if expected and expected != sha256_file(args.tokenizer):
        raise VimError(
            f"{args.model} was trained on tokens of another tokenizer (sha256 {expected[:12]}...), "
            f"not {args.tokenizer}"
        )
    if args.class_id is not None and not 0 <= args.class_id < max(model.num_classes, 1):
        raise VimError(f"--class {args.class_id} is outside 0..{model.num_classes - 1}")
    labels = args.class_id if model.num_classes > 0 and args.class_id is not None else None
    if model.num_classes > 0 and labels is None:
        labels = torch.arange(args.n) % model.num_classes  # balanced classes, one per grid column
    tokens = sample(
        model,
        args.n,
        labels,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        cfg_scale=args.cfg,
        seed=args.seed,
        progress=True,
        batch_size=args.batch_size,
    )
    images = tok.decode_uint8(tokens)
    _save_png(
        image_grid(images, columns=model.num_classes if labels is not None and args.class_id is None else 8),
        Path(args.out),
    )
    print(f"{args.out}: {args.n} samples")
    return 0


def _save_png(image, path: Path) -> None:
    """uint8 pixels as a PNG at `path`, whatever its suffix, written atomically: no half-written image."""
    import io

    from PIL import Image

    from vim_core.io import atomic_write_bytes
    from vim_core.train.tracking import to_hwc

    buf = io.BytesIO()
    Image.fromarray(to_hwc(image)).save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vim", description="ViT-VQGAN tokenizer + VIM Transformer tools")
    sub = parser.add_subparsers(dest="command", required=True)
    check = sub.add_parser("check-params", help="validate a params.yaml")
    check.add_argument("path", nargs="?", default="params.yaml")
    check.add_argument(
        "--dvc-yaml", help="whose stages' params must all be present (default: beside the file, else ./)"
    )
    check.set_defaults(func=_check_params)
    tok = sub.add_parser("train-tokenizer", help="train the tokenizer described by params.yaml")
    tok.add_argument("--params", default="params.yaml")
    tok.add_argument("--plots", default="plots", help="folder for loss curves and the reconstruction grid")
    tok.add_argument("--metrics", default="metrics/tokenizer.json", help="where to write the eval metrics")
    tok.set_defaults(func=_train_tokenizer)
    vim = sub.add_parser("pretrain-transformer", help="train the Transformer described by params.yaml")
    vim.add_argument("--params", default="params.yaml")
    vim.add_argument("--plots", default="plots", help="folder for loss curves")
    vim.add_argument("--metrics", default="metrics/transformer.json", help="where to write the metrics")
    vim.set_defaults(func=_pretrain_transformer)

    enc = sub.add_parser("encode", help="images -> token ids (.npz)")
    enc.add_argument("images", nargs="+")
    enc.add_argument("--tokenizer", required=True, help="tokenizer.safetensors")
    enc.add_argument("--out", required=True)
    enc.add_argument("--fit", choices=["resize", "center_crop", "pad"], default="center_crop")
    enc.add_argument("--batch-size", type=int, default=256)
    enc.set_defaults(func=_encode)

    dec = sub.add_parser("decode", help="token ids (.npz) -> PNG images")
    dec.add_argument("tokens")
    dec.add_argument("--tokenizer", required=True)
    dec.add_argument("--out", required=True, help="output folder")
    dec.add_argument("--batch-size", type=int, default=256)
    dec.set_defaults(func=_decode)

    smp = sub.add_parser("sample", help="sample images from a trained Transformer into a PNG grid")
    smp.add_argument("--model", required=True, help="transformer.safetensors")
    smp.add_argument("--tokenizer", required=True)
    smp.add_argument(
        "--class", dest="class_id", type=int, default=None, help="class id; default: all classes"
    )
    smp.add_argument("-n", type=int, default=64)
    smp.add_argument("--temperature", type=float, default=1.0)
    smp.add_argument("--top-k", type=int, default=None)
    smp.add_argument("--top-p", type=float, default=None)
    smp.add_argument("--cfg", type=float, default=1.0, help="classifier-free guidance scale; 1.0: off")
    smp.add_argument("--seed", type=int, default=0)
    smp.add_argument("--batch-size", type=int, default=64)
    smp.add_argument("--out", required=True, help="grid.png")
    smp.set_defaults(func=_sample)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as err:
        for line in err.lines:
            print(f"error: {line}", file=sys.stderr)
        return 2
    except VimError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
