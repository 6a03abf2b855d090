"""``normswap.convert_checkpoint``: convert the weights in a checkpoint file without a model in memory.

The model is built on the ``meta`` device (a skeleton holding no memory) and converted there; the key map
from the checkpoint to the converted skeleton then says, for every output tensor, which input tensors it
comes from. A ``.safetensors`` output is streamed tensor by tensor from the memory-mapped input, so peak
memory stays near the largest tensor. When the output is an HF folder, or when the spec creates tensors
that no input holds (a registered spec with new parameters), the model is materialized instead: built,
loaded, converted for real and saved.
"""

from __future__ import annotations

import copy
import os
import pathlib
import time
from dataclasses import dataclass, field
from typing import Any

from ..calibration import Calibration
from ..errors import CheckpointError, NormSwapError, OptionError
from ..io.progress import Progress
from ..core.plan import Plan
from ..specs import get_spec
from ..io.atomic import atomic_output, check_destination
from .hf_layout import in_model_layout
from .keymap import map_keys
from .save_load import load_mapped, base_builder, recorded_conversions, skeleton
from .record import make_record, replay
from ..io.readers import PICKLE_SUFFIXES
from .record import open_checkpoint
from .writers import write_hf_folder, write_mapped, write_model


@dataclass
class ConvertedCheckpoint:
    """What :func:`convert_checkpoint` wrote: where, how (streamed or materialized), the plan and notes."""

    path: pathlib.Path
    plan: Plan
    streamed: bool
    tensors: int
    bytes_written: int
    seconds: float
    notes: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        how = "streamed tensor by tensor" if self.streamed else "model materialized"
        size = f"{self.bytes_written / 2**20:.1f} MB" if self.bytes_written else "folder"
        lines = [f"wrote {self.path} ({self.tensors} tensors, {size}, {how}, {self.seconds:.1f} s)",
                 self.plan.summary()]
        return "\n".join(lines + [f"note: {n}" for n in self.notes] + [f"warning: {w}" for w in self.plan.warnings])


def _convert_skeleton(skel, spec: str, options: dict[str, Any], folder: bool, ckpt, src: pathlib.Path,
                      notes: list[str]):
    """Convert the meta-device skeleton; ``(keymap, plan, converted)`` when the output can be streamed from
    the input's tensors, ``keymap=None`` when the model must be materialized (notes say why)."""
    from ..core.convert import convert
    from ..core.state import last_plan

    before = {k: id(v) for k, v in skel.state_dict(keep_vars=True).items()}
    try:
        converted = convert(skel, spec, inplace=True, **options)
        plan = last_plan(converted)
        # a tensor under an unchanged key but no longer the same object was made anew: its value may be
        # derived (Gemma's 1 + weight folded into a LayerNorm weight), so only a real conversion is safe
        derived = [k for k, v in converted.state_dict(keep_vars=True).items() if k in before and id(v) != before[k]]
        if derived:
            notes.append(f"spec {spec!r} makes {len(derived)} tensor(s) anew from their old values (e.g. "
                         f"{derived[0]}): the model was converted in memory")
        elif not folder:
            return map_keys(converted, ckpt.tensors, where=str(src)), plan, converted
    except NormSwapError as exc:
        if not isinstance(exc, CheckpointError):
            raise
        # CheckpointError: the spec made tensors no input holds -> materialize
    except Exception as exc:  # a builder that needs real values: materialize
        notes.append(f"spec {spec!r} does not convert a meta-device skeleton ({type(exc).__name__}: {exc}); "
                     "the model was converted in memory instead")
    return None, None, None


def is_folder_output(out: pathlib.Path) -> bool:
    """Whether ``out`` names an HF folder (no ``.safetensors`` suffix) rather than a file."""
    return out.suffix.lower() != ".safetensors"


def convert_checkpoint(src: str | os.PathLike, out: str | os.PathLike, spec: str, *, model: str | None = None,
                       model_kwargs: dict[str, Any] | None = None, force: bool = False, progress: bool = False,
                       calibrate: Calibration | None = None, **options: Any) -> ConvertedCheckpoint:
    """Convert the checkpoint ``src`` with ``spec`` and write it to ``out`` (a ``.safetensors`` file, or an
    HF folder written with ``save_pretrained``), recording the base model and conversions in it.

    ``model`` is ``"timm:NAME"`` or an HF folder; it may be left out when ``src`` is an HF folder or a
    checkpoint normswap wrote. ``src`` is never modified; ``out`` is written atomically and an existing
    one is replaced only with ``force=True``. ``calibrate=Calibration(data, ...)`` trains the converted
    model to reproduce the original's outputs on ``data`` before it is written (its report is in the notes).

    Example:
        >>> convert_checkpoint("resnet50.safetensors", "resnet50_gn_ws.safetensors", "gn_ws",
        ...                    model="timm:resnet50")  # doctest: +SKIP
    """
    from ..core.convert import convert
    from ..core.state import last_plan

    start = time.perf_counter()
    src, out = pathlib.Path(src), pathlib.Path(out)
    if out.suffix.lower() in PICKLE_SUFFIXES:
        raise OptionError(f"{out}: normswap writes .safetensors files or HF folders, not pickles")
    get_spec(spec)  # an unknown spec fails before any file is read
    folder = is_folder_output(out)
    with open_checkpoint(src) as opened:
        inputs = [src, *opened.files]
        check_destination(out, force=force, inputs=inputs)
        build = base_builder(opened, model, dict(model_kwargs or {}))
        conversions = recorded_conversions(opened)
        notes: list[str] = []
        skel = skeleton(build, conversions, notes)
        ckpt = in_model_layout(skel, opened)  # tensors transformers would convert on load, converted
        base_map = map_keys(skel, ckpt.tensors, where=str(src))  # the checkpoint fits its model
        notes += base_map.notes
        keymap, plan, converted = None, None, None
        if options.get("exact") is True:  # the residual stream is found by running the model: materialize
            notes.append("exact=True runs the model once to find its residual stream: the model was converted "
                         "in memory")
        elif calibrate is not None:
            notes.append("calibration trains the converted model: it was converted in memory")
        else:
            keymap, plan, converted = _convert_skeleton(skel, spec, options, folder, ckpt, src, notes)
        total = keymap.nbytes if keymap is not None else ckpt.nbytes
        with Progress(f"converting {src.name}", total, enabled=progress) as bar:
            if keymap is not None:
                notes += keymap.notes
                record = make_record(converted, source=src.name)
                with atomic_output(out, force=force, inputs=inputs) as tmp, open(tmp, "wb") as f:
                    written = write_mapped(f, ckpt, keymap, record, str(out), bar.update)
                count = len(keymap.entries) - len(keymap.aliases)
            else:
                real = replay(build(), conversions)
                load_mapped(real, ckpt, base_map)
                bar.update(ckpt.nbytes / 2)
                original = copy.deepcopy(real) if calibrate is not None else None
                real = convert(real, spec, inplace=True, **options)
                plan = last_plan(real)
                if original is not None:
                    notes.append(str(calibrate.run(real, original)))
                    del original
                notes.append(f"spec {plan.spec}: {get_spec(spec).changed_keys}")
                with atomic_output(out, force=force, folder=folder, inputs=inputs) as tmp:
                    if folder:
                        write_hf_folder(tmp, real, src, quiet=not progress)
                        written = 0
                    else:
                        with open(tmp, "wb") as f:
                            written = write_model(f, real, make_record(real, source=src.name), str(out))
                count = len(real.state_dict())
                bar.update(ckpt.nbytes / 2)
    return ConvertedCheckpoint(out, plan, keymap is not None, count, written, time.perf_counter() - start, notes)
