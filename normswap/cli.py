"""The ``normswap`` console script: ``list`` and ``plan``/``inspect``.

Exit codes: 0 ok, 1 failure, 2 bad usage (unknown spec, option or model name).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from .errors import NormSwapError, OptionError, UnknownSpecError
from .specs.options import parse_option_value

EPILOG_LIST = "example:\n  normswap list\n  normswap list --verbose"
EPILOG_PLAN = ("examples:\n  normswap plan --model timm:resnet50 --spec gn_ws\n"
               "  normswap plan --model ./bert-config/ --spec rms --set eps=1e-6")


def _cmd_list(args: argparse.Namespace) -> int:
    from .specs import list_specs

    specs = list_specs()
    width = max(len(n) for n in specs)
    for name, spec in specs.items():
        print(f"{name.ljust(width)}  {spec.description}")
        if args.verbose:
            for opt in spec.options.values():
                print(f"{'':{width}}    --set {opt.name}=<{opt.type_name()}> (default {opt.default!r})")
            takes = ", ".join(spec.sources) + " norms" if spec.sources else "convs and linears"
            print(f"{'':{width}}    takes: {takes}; preserves computation: {spec.preserves}")
            print(f"{'':{width}}    checkpoint keys: {spec.changed_keys}")
    return 0


def _parse_sets(pairs: Sequence[str]) -> dict:
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise NormSwapError(f"--set {pair!r}: expected key=value")
        out[key.strip()] = parse_option_value(value.strip())
    return out


def _cmd_plan(args: argparse.Namespace) -> int:
    from .engine import plan
    from .models import build_model

    options = _parse_sets(args.set or [])
    if args.include:
        options["include"] = args.include
    if args.exclude:
        options["exclude"] = args.exclude
    model = build_model(args.model)
    print(plan(model, args.spec, **options))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="normswap", description="Swap the norm layers of timm and HF models.")
    sub = parser.add_subparsers(dest="command", required=True)
    p_list = sub.add_parser("list", help="list the registered specs", epilog=EPILOG_LIST,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    p_list.add_argument("--verbose", "-v", action="store_true", help="show each spec's options and keys")
    p_list.set_defaults(func=_cmd_list)
    p_plan = sub.add_parser("plan", aliases=["inspect"], help="show what convert would change",
                            epilog=EPILOG_PLAN, formatter_class=argparse.RawDescriptionHelpFormatter)
    p_plan.add_argument("--model", required=True, help="timm:NAME or a HuggingFace config folder")
    p_plan.add_argument("--spec", required=True, help="a registered spec name (see `normswap list`)")
    p_plan.add_argument("--set", action="append", metavar="KEY=VALUE", help="a spec option, repeatable")
    p_plan.add_argument("--include", action="append", metavar="GLOB", help="module-path glob to convert")
    p_plan.add_argument("--exclude", action="append", metavar="GLOB", help="module-path glob to leave alone")
    p_plan.set_defaults(func=_cmd_plan)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``normswap`` console script.

    Example:
        >>> main(["list"])  # doctest: +SKIP
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except NormSwapError as exc:
        print(f"normswap: error: {exc}", file=sys.stderr)
        return 2 if isinstance(exc, (UnknownSpecError, OptionError)) else 1


if __name__ == "__main__":
    sys.exit(main())
