"""The ``normswap`` console script: ``list``, ``plan``, ``convert``, ``inspect``, ``validate``, ``finetune``.

Every command calls one public function (``normswap.plan``, ``normswap.convert_checkpoint``,
``normswap.inspect``); this file only parses arguments and prints.

Exit codes: 0 ok; 1 the work failed (unreadable or corrupt checkpoint, wrong architecture, refused
pickle, write error); 2 bad usage (unknown spec, option or model name, missing input, existing output
without --force); 130 interrupted (Ctrl-C; no partial output is left).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import pathlib
import sys
import warnings
from collections.abc import Sequence

from .errors import (CheckpointNotFoundError, DestinationExistsError, NormSwapError, OptionError,
                     UnknownSpecError)
from .specs.options import parse_option_value

EPILOG_LIST = "example:\n  normswap list\n  normswap list --verbose"
EPILOG_PLAN = ("examples:\n  normswap plan --model timm:resnet50 --spec gn_ws\n"
               "  normswap plan --model ./bert-config/ --spec rms --set eps=1e-6")
EPILOG_CONVERT = (
    "examples:\n"
    "  normswap convert resnet50.safetensors --model timm:resnet50 --spec gn_ws --out resnet50_gn_ws.safetensors\n"
    "  normswap convert finetuned.pth --model timm:resnet50 --model-arg num_classes=10 --spec gn --set groups=16 \\\n"
    "      --out r50_gn.safetensors\n"
    "  normswap convert ./bert-base/ --spec rms --out ./bert-base-rms/      # an HF folder in, an HF folder out\n"
    "  normswap convert ./gpt2/ --spec rms --exact --out ./gpt2-rms/        # pre-LN: identical outputs\n"
    "  normswap convert r50.safetensors --model timm:resnet50 --spec gn_ws --out r50_gn_ws.safetensors \\\n"
    "      --calibrate ./train-images/ --calibrate-seconds 120           # calibrated on unlabeled images\n"
    "\nexit codes: 0 ok, 1 failure (unreadable or wrong checkpoint), 2 bad usage, 130 interrupted")
EPILOG_INSPECT = ("examples:\n  normswap inspect timm:convnext_tiny\n  normswap inspect resnet50_gn_ws.safetensors\n"
                  "  normswap inspect model.pth --model timm:resnet50\n  normswap inspect ./bert-base/")
EPILOG_FINETUNE = (
    "examples:\n"
    "  normswap finetune recipes/gn_ws_resnet_microbatch.yaml data=builtin\n"
    "  normswap finetune recipes/bert_rms_text.yaml data=builtin max_steps=120 output_dir=runs/try\n"
    "  normswap finetune recipes/gn_ws_resnet_microbatch.yaml --validate-only\n"
    "  normswap finetune recipes/gn_ws_resnet_microbatch.yaml resume=runs/gn_ws_resnet_microbatch\n"
    "  torchrun --nproc_per_node 2 -m normswap.cli finetune recipes/gn_ws_resnet_microbatch.yaml data=builtin\n"
    "\nexit codes: 0 ok (or valid), 1 the run failed, 2 the recipe or its overrides have problems, 130 interrupted")
EPILOG_VALIDATE = (
    "examples:\n"
    "  normswap validate --model timm:resnet50 --spec gn_ws\n"
    "  normswap validate --model timm:resnet50 --spec gn_ws --checkpoint resnet50.safetensors --device cuda\n"
    "  normswap validate --model ./bert-base/ --spec rms --json --skip compile\n"
    "\nexit codes: 0 every check passed, 1 a check failed, 2 bad usage")
USAGE_ERRORS = (UnknownSpecError, OptionError, DestinationExistsError, CheckpointNotFoundError)


def _usage_error(exc: NormSwapError) -> bool:
    from .finetune.data import DataError
    from .finetune.recipe import RecipeError

    return isinstance(exc, (*USAGE_ERRORS, RecipeError, DataError))


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


def _spec_options(args: argparse.Namespace) -> dict:
    options = _parse_sets(args.set or [])
    if args.include:
        options["include"] = args.include
    if args.exclude:
        options["exclude"] = args.exclude
    if args.exact:
        options["exact"] = True
    return options


def _cmd_plan(args: argparse.Namespace) -> int:
    from .core.convert import plan
    from .named_models import build_model

    options = _spec_options(args)
    # exact=True runs the model once to find its residual stream: that needs real weights, not a skeleton
    device = None if args.exact else "meta"
    print(plan(build_model(args.model, device=device, **_parse_sets(args.model_arg or [])), args.spec, **options))
    return 0


def _cmd_convert(args: argparse.Namespace) -> int:
    from .checkpoints import convert_checkpoint

    calibration = None
    if args.calibrate:
        from .calibration import Calibration

        tokenizer = args.tokenizer or (args.src if pathlib.Path(args.src).is_dir() else None)
        calibration = Calibration(args.calibrate, seconds=args.calibrate_seconds, steps=args.calibrate_steps,
                                  params=args.calibrate_params, batch_size=args.calibrate_batch_size,
                                  tokenizer=tokenizer)
    elif any(v is not None for v in (args.calibrate_seconds, args.calibrate_steps, args.tokenizer)):
        raise OptionError("--calibrate-seconds, --calibrate-steps and --tokenizer go with --calibrate DATA")
    result = convert_checkpoint(args.src, args.out, args.spec, model=args.model,
                                model_kwargs=_parse_sets(args.model_arg or []), force=args.force,
                                progress=not args.quiet, calibrate=calibration, **_spec_options(args))
    if not args.quiet:
        print(result)
    return 0


def _cmd_inspect(args: argparse.Namespace) -> int:
    from .inspection import inspect

    print(inspect(args.target, model=args.model))
    return 0


def _cmd_finetune(args: argparse.Namespace) -> int:
    from .finetune import finetune, load_config

    if args.validate_only:
        load_config(args.recipe, args.overrides)
        print(f"{args.recipe}: valid")
        return 0
    result = finetune(args.recipe, args.overrides, progress=not args.quiet)
    if not args.quiet and os.environ.get("RANK", "0") == "0":
        print(result)
    return 0


def _cmd_validate(args: argparse.Namespace) -> int:
    from .checkpoints import load_state_dict
    from .core.convert import convert
    from .named_models import build_model
    from .validation import example_inputs, validate

    original = build_model(args.model, **_parse_sets(args.model_arg or []))
    if args.checkpoint:
        load_state_dict(original, args.checkpoint)
    original.eval()
    converted = convert(original, args.spec, **_spec_options(args))
    inputs = example_inputs(original, batch=args.batch, image_size=args.image_size)
    if not args.json and "compile" not in (args.skip or ()):
        print("normswap: validating; the torch.compile check alone takes a minute or more on a CPU (--skip compile "
              "leaves it out; --image-size 64 makes every check quicker)", file=sys.stderr)
    report = validate(original, converted, inputs, device=args.device, skip=args.skip or ())
    print(report.to_json() if args.json else report)
    return 0 if report.passed else 1


def _add_spec_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--spec", required=True, help="a registered spec name (see `normswap list`)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="a spec option, repeatable")
    p.add_argument("--include", action="append", metavar="GLOB", help="module-path glob to convert")
    p.add_argument("--exclude", action="append", metavar="GLOB", help="module-path glob to leave alone")
    p.add_argument("--exact", action="store_true",
                   help="rms only: center the residual stream's writers so that every LayerNorm -> RMSNorm keeps "
                        "the outputs exactly (pre-LN transformers; post-LN models are refused)")
    p.add_argument("--model-arg", action="append", metavar="KEY=VALUE",
                   help="a timm.create_model argument, repeatable (e.g. num_classes=10)")


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(prog="normswap", description="Swap the norm layers of timm and HF models.")
    parser.add_argument("--version", action="version", version=f"normswap {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    p_list = sub.add_parser("list", help="list the registered specs", epilog=EPILOG_LIST,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    p_list.add_argument("--verbose", "-v", action="store_true", help="show each spec's options and keys")
    p_list.set_defaults(func=_cmd_list)
    raw = argparse.RawDescriptionHelpFormatter
    p_plan = sub.add_parser("plan", help="show what convert would change", epilog=EPILOG_PLAN, formatter_class=raw)
    p_plan.add_argument("--model", required=True, help="timm:NAME or a HuggingFace config folder")
    _add_spec_args(p_plan)
    p_plan.set_defaults(func=_cmd_plan)
    p_conv = sub.add_parser("convert", help="convert a checkpoint file or HF folder", epilog=EPILOG_CONVERT,
                            formatter_class=raw)
    p_conv.add_argument("src", metavar="SRC", help="a .safetensors/.pt/.pth/.bin checkpoint or an HF model folder")
    p_conv.add_argument("--model", help="timm:NAME or an HF folder holding config.json (not needed when SRC is an "
                                        "HF folder or a checkpoint normswap wrote)")
    _add_spec_args(p_conv)
    p_conv.add_argument("--out", required=True, metavar="DST",
                        help="output: NAME.safetensors, or a folder (HF models, written with save_pretrained)")
    p_conv.add_argument("--force", action="store_true", help="replace DST if it exists (never an input)")
    p_conv.add_argument("--quiet", "-q", action="store_true", help="no progress bar and no summary")
    cal = p_conv.add_argument_group("calibration (give a pretrained model its function back, without labels)")
    cal.add_argument("--calibrate", metavar="DATA", help="an image folder (a subfolder per class) or a text table "
                     "(.csv/.jsonl, text and label columns): the converted model learns the original's outputs on "
                     "its inputs before it is written")
    cal.add_argument("--calibrate-seconds", type=float, metavar="S", help="time budget (default: one pass over DATA)")
    cal.add_argument("--calibrate-steps", type=int, metavar="N", help="step budget")
    cal.add_argument("--calibrate-params", choices=("norms", "all"), default="norms",
                     help="train the converted norms' affine parameters (default) or every parameter")
    cal.add_argument("--calibrate-batch-size", type=int, default=32, metavar="B")
    cal.add_argument("--tokenizer", metavar="DIR", help="a local tokenizer folder for a text table (default: SRC "
                     "when it is an HF folder)")
    p_conv.set_defaults(func=_cmd_convert)
    p_insp = sub.add_parser("inspect", help="list the norm layers of a model and the tensors of a checkpoint",
                            epilog=EPILOG_INSPECT, formatter_class=raw)
    p_insp.add_argument("target", metavar="SRC_OR_MODEL", help="timm:NAME, an HF folder, or a checkpoint file")
    p_insp.add_argument("--model", help="the architecture of a checkpoint that does not name it (timm:NAME, HF folder)")
    p_insp.set_defaults(func=_cmd_inspect)
    p_val = sub.add_parser("validate", help="build, convert and check a model's behaviour", epilog=EPILOG_VALIDATE,
                           formatter_class=raw)
    p_val.add_argument("--model", required=True, help="timm:NAME or an HF folder holding config.json")
    _add_spec_args(p_val)
    p_val.add_argument("--checkpoint", help="weights of the original model to load first (any format normswap reads)")
    p_val.add_argument("--device", default="cpu", help="cpu (default) or cuda: run the checks there, plus CPU vs GPU")
    p_val.add_argument("--skip", action="append", metavar="CHECK", help="leave a check out (e.g. compile), repeatable")
    p_val.add_argument("--batch", type=int, default=2, help="example batch size (default 2)")
    p_val.add_argument("--image-size", type=int, default=None, help="example image size (default: the model's)")
    p_val.add_argument("--json", action="store_true", help="print the report as JSON")
    p_val.set_defaults(func=_cmd_validate)
    p_ft = sub.add_parser("finetune", help="run a fine-tuning recipe (YAML)", epilog=EPILOG_FINETUNE,
                          formatter_class=raw)
    p_ft.add_argument("recipe", metavar="RECIPE", help="a recipe YAML file (see recipes/)")
    p_ft.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                      help="recipe keys to override, dotted for sections (optimizer.lr=0.1, data=builtin)")
    p_ft.add_argument("--validate-only", action="store_true", help="check the recipe and exit (0 valid, 2 not)")
    p_ft.add_argument("--quiet", "-q", action="store_true", help="no progress bar and no summary")
    p_ft.set_defaults(func=_cmd_finetune)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``normswap`` console script.

    Example:
        >>> main(["list"])  # doctest: +SKIP
    """
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if args.command == "finetune":  # KEY=VALUE overrides may come after --validate-only / --quiet
        args.overrides += [e for e in extra if "=" in e and not e.startswith("-")]
        extra = [e for e in extra if not ("=" in e and not e.startswith("-"))]
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        with _clean_warnings():
            return args.func(args)
    except NormSwapError as exc:
        print(f"normswap: error: {exc}", file=sys.stderr)
        return 2 if _usage_error(exc) else 1
    except BrokenPipeError:  # `normswap inspect ... | head`: the reader has what it wanted
        _silence_stdout()
        return 0
    except KeyboardInterrupt:
        print("normswap: interrupted; no output was written", file=sys.stderr)
        return 130
    except Exception as exc:  # disk full, permission denied, a library's own error: one line, exit 1
        if os.environ.get("NORMSWAP_DEBUG"):
            raise
        print(f"normswap: error: {type(exc).__name__}: {str(exc).strip() or 'no message'} (NORMSWAP_DEBUG=1 shows "
              "the traceback)", file=sys.stderr)
        return 1


@contextlib.contextmanager
def _clean_warnings():
    """Warnings printed once each, as one ``normswap: warning:`` line (no source line, no repeats)."""
    shown: set[str] = set()

    def show(message, category, filename, lineno, file=None, line=None):
        text = str(message).removeprefix("normswap: ")
        if text not in shown:
            shown.add(text)
            print(f"normswap: warning: {text}", file=sys.stderr)

    with warnings.catch_warnings():
        warnings.simplefilter("default")
        warnings.showwarning = show
        yield


def _silence_stdout() -> None:
    """Point stdout at /dev/null, so the interpreter's final flush into the closed pipe raises nothing."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):  # stdout is no file descriptor (captured): nothing to flush
        pass


if __name__ == "__main__":
    sys.exit(main())
