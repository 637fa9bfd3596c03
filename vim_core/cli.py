"""The `vim` command: check-params now; encode, decode and sample join as their stages land."""

import argparse
import sys

from vim_core.errors import ConfigError, VimError


def _check_params(args: argparse.Namespace) -> int:
    from vim_core.config import load_params

    load_params(args.path)
    print(f"{args.path}: ok")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vim", description="ViT-VQGAN tokenizer + VIM Transformer tools")
    sub = parser.add_subparsers(dest="command", required=True)
    check = sub.add_parser("check-params", help="validate a params.yaml")
    check.add_argument("path", nargs="?", default="params.yaml")
    check.set_defaults(func=_check_params)
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
