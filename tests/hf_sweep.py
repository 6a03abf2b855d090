"""The whole transformers zoo: every model type in transformers' config mapping, built from its default
config shrunk generically, converted with every spec whose source family it holds, and checked.

One model type runs in one subprocess with a timeout (``python tests/hf_sweep.py --one TYPE`` prints a
JSON line); ``python tests/hf_sweep.py --out results.jsonl`` runs them all, two at a time, and prints the
table. ``tests/test_hf_sweep.py`` runs a seeded sample in the default suite and every type under ``slow``.

A type is *skipped* when its default config does not build, shrunk or not, or the unconverted model does
not run on generated inputs; every other outcome is the conversion's: the checks of ``spec_checks.py``
for every spec whose source family the model holds, the round trip through ``save_pretrained`` and
``normswap.load``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import subprocess
import sys
import tempfile
import time
import traceback
import warnings

import torch
from torch import nn

from spec_checks import SPECS, check_spec, output_tensor, present_specs, run
from sweep_runner import ResultLog, run_forked

SEED = 20261127
TIMEOUT = 300

# config keys, by what they size, and the value a tiny model gets
_LAYERS = {"num_hidden_layers", "num_layers", "n_layer", "n_layers", "encoder_layers", "decoder_layers",
           "num_encoder_layers", "num_decoder_layers", "depth", "num_blocks", "text_num_layers",
           "vision_num_layers", "num_transformer_layers", "num_attention_layers"}
_WIDTH = {"hidden_size": 64, "d_model": 64, "n_embd": 64, "embed_dim": 64, "dim": 64, "hidden_dim": 64,
          "intermediate_size": 64, "ffn_dim": 64, "encoder_ffn_dim": 64, "decoder_ffn_dim": 64, "d_ff": 64,
          "mlp_dim": 64, "moe_intermediate_size": 32, "shared_expert_intermediate_size": 32, "n_inner": 64,
          "projection_dim": 32, "text_hidden_size": 64, "decoder_hidden_size": 64, "encoder_hidden_size": 64,
          "embedding_size": 32, "projector_hidden_size": 64, "out_hidden_size": 64, "kv_lora_rank": 16,
          "q_lora_rank": 16, "head_dim": 16, "d_kv": 16, "qk_head_dim": 16, "v_head_dim": 16,
          "qk_rope_head_dim": 8, "qk_nope_head_dim": 8, "attention_head_dim": 16}
_HEADS = {"num_attention_heads", "num_heads", "n_head", "n_heads", "encoder_attention_heads",
          "decoder_attention_heads"}
_EXPERTS = {"num_experts": 4, "n_routed_experts": 4, "num_local_experts": 4, "num_experts_per_tok": 2,
            "moe_topk": 2, "n_group": 1, "topk_group": 1, "n_shared_experts": 1}
_VOCAB = 512


ATTEMPTS = ((True, True), (True, False), (False, True), (False, False))  # (shrink widths, shrink image size)


def _shrink_dict(d: dict, widths: bool, image: bool) -> dict:
    """A config dict with its sizes made tiny: depth, experts and vocab always; the widths and the image size
    when asked."""
    out = dict(d)
    layers_before = {k: v for k, v in d.items() if k in _LAYERS and isinstance(v, int)}
    for k, v in d.items():
        if isinstance(v, bool):
            continue
        if isinstance(v, dict) and (k.endswith("_config") or "model_type" in v):
            out[k] = _shrink_dict(v, widths, image)
        elif k in _LAYERS and isinstance(v, int) and v > 2 and not (isinstance(d.get("depths"), (list, tuple))
                                                                     and v == len(d["depths"])):  # stages, not layers
            out[k] = 2
        elif k in ("depths", "num_layers_per_stage") and isinstance(v, (list, tuple)):
            out[k] = [1 for _ in v]
        elif k in _EXPERTS and isinstance(v, int) and v > _EXPERTS[k]:
            out[k] = _EXPERTS[k]
        elif k.startswith("vocab_size") and isinstance(v, int) and v > _VOCAB:  # vocab_size_per_layer_input too
            out[k] = _VOCAB
        elif widths and k in _WIDTH and isinstance(v, int) and v > _WIDTH[k]:
            out[k] = _WIDTH[k]
        elif (widths and (k.endswith("_hidden_size") or k.startswith("hidden_size_")) and isinstance(v, int)
              and v > 64):
            out[k] = 64  # the width of another tower or input as this config names it: shrunk like its own
        elif widths and k in _HEADS and isinstance(v, int) and v > 4:
            out[k] = 4
        elif widths and k in ("width_coefficient", "depth_coefficient", "depth_multiplier") and isinstance(v, float):
            out[k] = min(v, 0.25)
        elif image and k == "image_size" and isinstance(v, int) and v > 64:
            patch = d.get("patch_size") if isinstance(d.get("patch_size"), int) else 1
            out[k] = 64 if 64 % patch == 0 else v
        elif widths and k == "num_key_value_heads" and isinstance(v, int):
            heads = next((d[h] for h in _HEADS if isinstance(d.get(h), int)), v)
            out[k] = v if v <= 2 else (4 if v >= heads else 2)
    # widths equal in the default config stay equal (DeepSeek's head_dim is its qk_rope_head_dim)
    if widths:
        for value in {v for k, v in d.items() if k in _WIDTH and isinstance(v, int)}:
            same = [k for k in _WIDTH if d.get(k) == value and isinstance(out.get(k), int)]
            if len({out[k] for k in same}) > 1:
                for k in same:
                    out[k] = min(out[k] for k in same)
    # widths split over heads stay divisible by every head count the config names (lists per stage too)
    counts = [c for k in _HEADS for v in [out.get(k)] for c in (v if isinstance(v, (list, tuple)) else [v])
              if isinstance(c, int) and not isinstance(c, bool) and c > 0]
    step = math.lcm(*counts) if counts else 1
    for k in ("hidden_size", "d_model", "n_embd", "embed_dim", "dim", "hidden_dim"):
        if widths and isinstance(d.get(k), int) and not isinstance(d.get(k), bool) and d[k] > _WIDTH[k]:
            out[k] = min(d[k], -(-_WIDTH[k] // step) * step)
    # a backbone's stages named by layer index would point past the last layer: let it pick its default
    if any(out[k] != v for k, v in layers_before.items()):
        for key in ("out_features", "out_indices"):
            if key in out:
                out[key] = None
    # per-layer lists sized by a layer count follow it, and per-layer settings keyed by layer index keep the
    # layers that remain (Gemma 4's per_layer_config: {"05": {"head_dim": 512}, ...})
    for k, before in layers_before.items():
        after = out[k]
        for key, value in d.items():
            if isinstance(value, list) and len(value) == before and before != after and key not in ("depths",):
                out[key] = value[:after]
            elif (key.startswith("per_layer") and isinstance(value, dict) and value and before != after
                  and all(isinstance(i, str) and i.isdigit() for i in value)):
                out[key] = {i: _shrink_dict(s, widths, image) if isinstance(s, dict) else s
                            for i, s in value.items() if int(i) < after}
    if "vocab_size" in out and isinstance(out["vocab_size"], int):
        vocab = out["vocab_size"]
        taken = 0
        for key, value in d.items():
            if (key.endswith("_token_id") or key.endswith("_token_index")) and isinstance(value, int) and value >= vocab:
                taken += 1
                out[key] = vocab - taken
    return out


MAX_PARAMS = 100e6


def model_class(config_cls: type) -> type:
    """The base model class for a config class: ``AutoModel``'s, else the model in the config's own package
    that declares it (sub-model configs such as a vision tower are not in ``AutoModel``'s mapping)."""
    import importlib

    from transformers import MODEL_MAPPING, PreTrainedModel

    try:
        return MODEL_MAPPING[config_cls]
    except (KeyError, ValueError):
        pass
    package = config_cls.__module__.rsplit(".", 1)[0]
    found = []
    for name in ("modeling_" + config_cls.__module__.rsplit(".configuration_", 1)[-1], "modeling"):
        try:
            module = importlib.import_module(f"{package}.{name}")
        except ImportError:
            continue
        found += [obj for obj in vars(module).values() if isinstance(obj, type) and issubclass(obj, PreTrainedModel)
                  and getattr(obj, "config_class", None) is config_cls]
    if not found:
        raise RuntimeError(f"no model class declares {config_cls.__name__}")
    return min(found, key=lambda c: (not c.__name__.endswith("Model"), len(c.__name__)))


def build(model_type: str, runnable: bool = True):
    """``(model, inputs, how)``: the tiniest config of ``model_type`` that builds and runs, or raise; with
    ``runnable=False``, where none runs, the tiniest that builds, with ``inputs`` ``None`` (``how`` then
    says why it did not run)."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    cls = CONFIG_MAPPING[model_type]
    errors, unrun = [], None
    for widths, image in ATTEMPTS:
        how = f"widths {'shrunk' if widths else 'kept'}, image size {'shrunk' if image else 'kept'}"
        try:
            base = cls()
            config = cls.from_dict(_shrink_dict(base.to_dict(), widths, image))
            torch.manual_seed(0)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model = model_class(cls)(config).eval()
            size = sum(p.numel() for p in model.parameters())
            if size > MAX_PARAMS:
                raise RuntimeError(f"{size / 1e6:.0f}M parameters")
        except Exception as exc:  # noqa: BLE001 - a config that does not build is a skip, with its reason
            errors.append(_failure(how, exc))
            continue
        try:
            return model, runnable_inputs(model), how
        except Exception as exc:  # noqa: BLE001 - built, but does not run on the generated inputs
            errors.append(_failure(how, exc))
            unrun = unrun or (model, None, errors[-1])
    if unrun is not None and not runnable:
        return unrun
    raise RuntimeError("; ".join(errors))


def _failure(how: str, exc: Exception) -> str:
    return f"{how}: {type(exc).__name__}: {str(exc).splitlines()[0][:150] if str(exc) else ''}"


def runnable_inputs(model: nn.Module) -> dict:
    """The first generated inputs the unconverted model runs on: its main input alone, then with token ids
    and pixels together (multimodal models)."""
    errors = []
    for variant in ("main", "text+image"):
        try:
            inputs = make_inputs(model, torch.Generator().manual_seed(0), variant)
            with torch.no_grad():
                out = run(model, inputs)
            if output_tensor(out) is None:
                raise RuntimeError("no floating tensor output with the batch dim")
            return inputs
        except Exception as exc:  # noqa: BLE001 - try the next kind of inputs
            errors.append(f"{variant}: {type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''}")
    raise RuntimeError("; ".join(errors))


def _image_size(config) -> tuple[int, int, int]:
    chans = getattr(config, "num_channels", None) or 3
    size = getattr(config, "image_size", None) or getattr(config, "input_size", None) or 224
    if isinstance(size, (list, tuple)):
        h, w = size[-2], size[-1]
    elif isinstance(size, dict):
        h, w = size.get("height", 224), size.get("width", 224)
    else:
        h = w = int(size)
    return int(chans), int(h), int(w)


def make_inputs(model: nn.Module, g: torch.Generator, variant: str = "main") -> dict:
    """Inputs of the kind ``model`` takes: token ids, pixels, audio features or waveforms; ``variant``
    ``"text+image"`` gives token ids and pixels together."""
    import inspect

    config = model.config
    params = inspect.signature(model.forward).parameters
    name = getattr(model, "main_input_name", "input_ids")
    if variant == "text+image":
        if not {"input_ids", "pixel_values"} <= set(params):
            raise RuntimeError("no text+image inputs")
        inputs = make_inputs(model, g, "text")
        inputs.update(make_inputs(model, g, "image"))
        return inputs
    name = {"text": "input_ids", "image": "pixel_values"}.get(variant, name)
    inputs: dict = {}
    if name == "input_ids" or (name not in params and "input_ids" in params):
        vocab = getattr(config, "vocab_size", None) or getattr(getattr(config, "text_config", None), "vocab_size", 99)
        inputs["input_ids"] = torch.randint(3, max(4, min(int(vocab), 99)), (2, 8), generator=g)
        if "decoder_input_ids" in params and getattr(config, "is_encoder_decoder", False):
            inputs["decoder_input_ids"] = torch.randint(3, max(4, min(int(vocab), 99)), (2, 5), generator=g)
    elif name in ("pixel_values", "pixel_values_videos"):
        vision = getattr(config, "vision_config", None) or config
        c, h, w = _image_size(vision)
        shape = (2, c, h, w)
        frames = getattr(vision, "num_frames", None)
        if isinstance(frames, int) and frames > 1 and name == "pixel_values_videos" or "video" in type(model).__name__.lower():
            shape = (2, int(frames or 2), c, h, w)
        inputs[name] = torch.randn(shape, generator=g)
    elif name == "input_features":
        bins = getattr(config, "num_mel_bins", None) or getattr(config, "feature_size", 80)
        frames = 2 * getattr(config, "max_source_positions", 50)
        inputs[name] = torch.randn(2, int(bins), int(frames), generator=g)
    elif name == "input_values":
        inputs[name] = torch.randn(2, 8000, generator=g)
    else:
        raise RuntimeError(f"main input {name!r} is not generated by this sweep")
    return inputs


def _reload(model: nn.Module) -> nn.Module:
    """``model`` through ``save_pretrained`` and ``normswap.load``."""
    import normswap

    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        return normswap.load(tmp)


def one(model_type: str, report=lambda partial: None) -> dict:
    """Build, convert and check one model type; a JSON-able result (``report`` gets it once the model built,
    then after each spec, so a timeout later says where it stopped)."""
    from transformers.utils import logging as hf_logging

    start = time.time()
    torch.set_num_threads(1)
    hf_logging.disable_progress_bar()
    try:
        model, inputs, how = build(model_type, runnable=False)
    except Exception as exc:  # noqa: BLE001
        return {"type": model_type, "built": False, "reason": str(exc)[:400], "seconds": time.time() - start}
    result = {"type": model_type, "built": inputs is not None, "how": how, "class": type(model).__name__, "specs": {}}
    if inputs is None:  # built but did not run: the structural checks alone (plan rows, conversion, class)
        result.update(reason=how, structure_only=True)
    report(result)
    for spec in present_specs(model):
        result["running"] = spec
        report(result)
        try:
            failures = check_spec(model, inputs, spec, _reload)
        except Exception:  # noqa: BLE001
            failures = [f"sweep error: {traceback.format_exc(limit=2)[-300:]}"]
        result["specs"][spec] = failures
    result.pop("running", None)
    result["seconds"] = time.time() - start
    return result


def run_isolated(model_type: str, timeout: int = TIMEOUT) -> dict:
    """:func:`one` in a fresh interpreter with a timeout (a crash or a hang is that type's failure)."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "TRANSFORMERS_VERBOSITY": "error", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, os.path.abspath(__file__), "--one", model_type]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env,
                              cwd=os.path.dirname(os.path.abspath(__file__)))
    except subprocess.TimeoutExpired:
        return {"type": model_type, "built": None, "reason": f"timed out after {timeout} s"}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if not lines:
        return {"type": model_type, "built": None, "reason": f"exit {proc.returncode}: {proc.stderr[-300:]}"}
    return json.loads(lines[-1])


def _safe_one(model_type: str, report) -> dict:
    try:
        return one(model_type, report)
    except BaseException as exc:  # noqa: BLE001 - report whatever ended the check
        return {"type": model_type, "built": None, "reason": f"{type(exc).__name__}: {exc}"[:400]}


def _failed(model_type: str, why: str, partial: dict | None) -> dict:
    """A child that died or timed out: before its model built, a type that did not build; after, a failure of
    the spec it was checking."""
    if not partial:
        return {"type": model_type, "built": None, "reason": why}
    result = dict(partial)
    spec = result.pop("running", None)
    if spec is not None:
        result["specs"] = {**result["specs"], spec: [why]}
    return result


def model_types() -> list[str]:
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    return sorted(CONFIG_MAPPING_NAMES)


def sample(k: int) -> list[str]:
    return sorted(random.Random(SEED).sample(model_types(), k))


def table(results: list[dict]) -> str:
    """Markdown: types enumerated, built, and per spec the types that hold its family and pass; the types that
    built but did not run (structural checks alone) in columns of their own."""
    built = [r for r in results if r.get("built")]
    unrun = [r for r in results if r.get("structure_only")]
    lines = [f"{len(results)} of the {len(model_types())} model types of the config mapping swept, {len(built)} "
             f"built and ran unconverted, {len(unrun)} more built but did not run on generated inputs (checked "
             "for plan rows, conversion and class alone)", "",
             "| spec | types that ran, with its source family | pass every check | share | built, not run | "
             "pass the structural checks |", "|---|---|---|---|---|---|"]
    for spec in SPECS:
        held = [r for r in built if spec in r["specs"]]
        ok = [r for r in held if not r["specs"][spec]]
        share = f"{100 * len(ok) / len(held):.1f}%" if held else "-"
        structural = [r for r in unrun if spec in r["specs"]]
        passed = [r for r in structural if not r["specs"][spec]]
        lines.append(f"| `{spec}` | {len(held)} | {len(ok)} | {share} | {len(structural)} | {len(passed)} |")
    return "\n".join(lines)


def write_record(results: list[dict], path: str) -> None:
    """The sweep as ``tests/data/hf_sweep.json`` records it: versions, date, and per type whether it built,
    in how many seconds, and each spec's failures (the fast suite samples from the types that built fast)."""
    import datetime

    import transformers

    types = {r["type"]: {"built": bool(r.get("built")), "seconds": round(r.get("seconds") or 0, 1),
                         **({"structure_only": True} if r.get("structure_only") else {}),
                         "specs": r.get("specs", {}), **({} if r.get("built") else {"reason": r.get("reason", "")})}
             for r in sorted(results, key=lambda r: r["type"])}
    record = {"transformers": transformers.__version__, "torch": torch.__version__,
              "date": datetime.date.today().isoformat(), "enumerated": len(model_types()), "types": types}
    with open(path, "w") as f:
        json.dump(record, f, indent=1, sort_keys=True)
        f.write("\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--one", help="check one model type in this process and print its JSON line")
    parser.add_argument("--out", help="write one JSON line per type here (appended; types already in it are skipped)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--timeout", type=int, default=TIMEOUT)
    parser.add_argument("--record", help="write the results as tests/data/hf_sweep.json records them")
    parser.add_argument("--report-only", action="store_true",
                        help="run nothing: print the table of --out (and write --record) as far as it goes")
    parser.add_argument("types", nargs="*")
    args = parser.parse_args(argv)
    if args.one:
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        print(json.dumps(one(args.one)), flush=True)
        return 0
    log = ResultLog(args.out, key=lambda r: r["type"])
    todo = [t for t in args.types or model_types() if t not in log.earlier]
    if args.report_only:
        todo = []

    def record(r: dict) -> None:
        log.add(r)
        bad = {s: f for s, f in r.get("specs", {}).items() if f}
        print(f"{r['type']}: {'built' if r.get('built') else 'skipped: ' + str(r.get('reason'))[:100]} {bad or ''}",
              flush=True)

    import normswap  # noqa: F401 - imported once here, inherited by every forked child
    import transformers.models.auto.modeling_auto  # noqa: F401

    torch.set_num_threads(1)
    run_forked(todo, _safe_one, _failed, workers=args.workers, timeout=args.timeout, done=record)
    print(table(log.all))
    if args.record:
        write_record(log.all, args.record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
