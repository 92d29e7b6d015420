"""Export a found architecture and load it back.

An export folder holds ``arch.json`` (the arch), ``model.json`` (a model card: the space
description needed to rebuild the model, metrics, origin), and the deployed model — the arch's
compression policy applied (BN folded, low-rank layers split, pruned, quantize-dequantized):

- ``weights.pt``: its PyTorch state dict (format ``pytorch``);
- ``model.packed``: the packed compressed file (format ``packed``, see :mod:`nasopt.compression.packed`),
  whose size is the arch's ``compressed_bytes``;
- ``model.onnx`` / ``model.int8.onnx``: ONNX float32 / int8 QDQ (formats ``onnx``,
  ``onnx-int8``, see :mod:`nasopt.deploy.onnx`), verified in ONNX Runtime against PyTorch;
- ``model.h`` / ``model.c`` / ``model.plan.json``: the model as integer C99 for a
  microcontroller and its integer plan (format ``c``, see :mod:`nasopt.deploy.firmware`): the
  packed file's weights at their bit-widths, int8 activations calibrated on training samples,
  verified on the host (the C compiler's logits equal the NumPy reference's bit for bit).

**Inputs**: every model file takes *raw* samples, as the dataset's file or loader gives them
(``sklearn.datasets.load_digits().images``: float32 values 0..16), reshaped to the model's input
shape ``(N, *input_shape)`` (digits: ``images.reshape(-1, 1, 8, 8)``). The dataset's preprocessing
(:class:`nasopt.core.data.Preprocess`, e.g. ``/ 16``) is applied inside: as the first nodes of
``model.onnx`` / ``model.int8.onnx``, in ``model.ts``, and by the module :func:`load` returns
(:class:`RawInput` around the network). ``model.json`` records both under ``input``. The
network's own weights (``weights.pt``, ``model.packed``, whose size is the arch's
``compressed_bytes``) do not change; ``model.packed`` loaded alone, outside its folder, has no
model card and is the bare network, taking preprocessed inputs.

**Weights**: ``model.json``'s ``weights`` says how they were made: ``inherited`` (``nasopt
export``: the supernet's weights, BN recalibrated, not retrained), ``fine-tuned`` or ``distilled,
fine-tuned`` (``nasopt finetune`` / ``nasopt run``).

Every export is verified after writing: each written format, loaded back, must reproduce the
in-memory model's outputs (max abs diff < 1e-6) on raw samples.

The commands that write an output folder (``nasopt export``, ``finetune``, ``distill``, ``run``)
refuse one that already holds files unless given ``--force`` (:func:`check_out`, before any
work); the folder then holds one model: the nasopt files (:data:`ARTIFACTS`) an earlier command
left there are replaced or removed (:func:`replace_artifacts`), every other file is kept.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from nasopt.core import checkpoint
from nasopt.compression import packed
from nasopt.core.arch import Arch
from nasopt.compression.compress import Policy, StoredLayer, compressed_structure
from nasopt.core.data import Preprocess
from nasopt.core.errors import NasoptError
from nasopt.core.space import SearchSpace, space_from_description

FORMAT_VERSION = 2
FORMATS = ("pytorch", "packed")  # the default; ONNX on request
ALL_FORMATS = (*FORMATS, "onnx", "onnx-int8", "c")
#: the files of the ``c`` format (nasopt.deploy.firmware.c_export.FILES; the card names model.c)
C_FILES = ("model.h", "model.c", "model.plan.json")
EXPORT_FILES = ("arch.json", "model.json", "weights.pt", "model.packed", "model.onnx",
                "model.int8.onnx", *C_FILES)
#: every file a nasopt command writes into its output folder: an export, plus what `finetune` /
#: `run` add (model.ts, metrics.json, REPORT.md) or a `distill` student folder holds
ARTIFACTS = (*EXPORT_FILES, "model.ts", "metrics.json", "REPORT.md", "student.json",
             "student.pt")
#: the commit records (written last): an export's model card, a student folder's card
RECORDS = ("model.json", "student.json")
TOLERANCE = 1e-6
#: ``model.json``'s ``weights``: how the exported weights were made
INHERITED = "inherited"


class RawInput(nn.Module):
    """A deployed network behind its dataset's preprocessing: takes raw samples, shaped as the
    network's inputs. ``net`` is the network itself (what ``weights.pt`` holds)."""

    def __init__(self, net: nn.Module, preprocess: Preprocess):
        super().__init__()
        self.net = net
        self.preprocess = preprocess

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.preprocess.apply(x))


def with_preprocess(net: nn.Module, preprocess: Preprocess | None) -> nn.Module:
    """``net`` taking raw samples: wrapped in :class:`RawInput` unless there is nothing to do."""
    if preprocess is None or preprocess.identity:
        return net
    return RawInput(net, preprocess)


def input_record(space: SearchSpace, preprocess: Preprocess | None) -> dict[str, Any]:
    """``model.json``'s ``input``: the layout and the preprocessing the model files apply."""
    shape = tuple(space.input_shape)
    record: dict[str, Any] = {
        "shape": ["N", *shape], "dtype": "float32",
        "layout": f"raw samples as the dataset's file or loader gives them, reshaped to "
                  f"(N, {', '.join(map(str, shape))}): x.reshape(-1, "
                  f"{', '.join(map(str, shape))})"}
    if preprocess is None:
        record["preprocess"] = None
        record["note"] = ("the preprocessing was not recorded: the model takes its inputs as "
                          "it was trained on them")
    else:
        record["preprocess"] = preprocess.to_dict()
        record["note"] = ("the preprocessing is applied inside every model file of this folder "
                          "(model.onnx, model.int8.onnx, model.ts, and nasopt.load of the folder "
                          "or its model.packed): feed raw samples")
    return record


def preprocess_of_card(card: Mapping[str, Any]) -> Preprocess | None:
    """The preprocessing an export's model card records (None: not recorded, an older export);
    a damaged record is one error."""
    record = card.get("input") or {}
    d = record.get("preprocess") if isinstance(record, Mapping) else record
    if d is None:
        return None
    try:
        pre = Preprocess.from_dict(d)
    except (AttributeError, TypeError, ValueError):
        pre = None
    if pre is None or not (pre.std > 0 and abs(pre.mean) < float("inf")):
        raise NasoptError(f"model.json: input.preprocess {d!r} is not a record of numbers "
                          f"mean and std (std > 0); export the model again")
    return pre


def check_out(out: str | Path, force: bool = False, option: str = "--out") -> Path:
    """The output folder ``out`` of a command, checked before any work: not a file, and (unless
    ``force``) holding no files yet, so that finished work is never replaced silently."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise NasoptError(f"{option} {out} is a file; give a folder path")
    # hidden files (.gitkeep, a killed write's .NAME.*.tmp) do not count
    held = sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) \
        if out.is_dir() else []
    if held and not force:
        shown = ", ".join(held[:6]) + (f", ... ({len(held)} in all)" if len(held) > 6 else "")
        raise NasoptError(f"{option} {out} already holds files ({shown}); choose a new {option}, "
                          f"or pass --force to replace the files with nasopt's names there "
                          f"(others are kept)")
    return out


def replace_artifacts(out: Path, files: Mapping[str, bytes], record: str) -> list[str]:
    """Make ``files`` (name: bytes) the nasopt files of the folder ``out``; returns their names.

    The new files are written (each fsynced) into a hidden working folder inside ``out``
    (:func:`working_folder`) first: a full disk fails there and leaves the old files as they
    were. Then the swap is made of renames within ``out``, which need no space and stay on one
    file system: the old nasopt files go to another hidden folder (the commit record first),
    the new ones come in (``record`` last), and the old ones are deleted. A failure midway puts
    the old files back; a process killed midway leaves them in their hidden folder, and the next
    command that writes into ``out`` puts them back (:func:`recover`). Files that are not
    :data:`ARTIFACTS` are left alone."""
    out.mkdir(parents=True, exist_ok=True)
    recover(out)
    staged = working_folder(out, NEW)
    try:
        for name, data in files.items():
            checkpoint.atomic_write_bytes(staged / name, data)
        swap_in(out, staged, record)
    finally:
        shutil.rmtree(staged, ignore_errors=True)
    return sorted(files)


#: nasopt's hidden working folders inside an output folder: ``.nasopt-new-*`` (files being
#: written or verified), ``.nasopt-old-*`` (the files a swap took out, until it is done); only
#: names of exactly this form are ever removed
NEW, OLD = ".nasopt-new-", ".nasopt-old-"
_WORKING = re.compile(r"\.nasopt-(new|old)-[A-Za-z0-9_]{8}")
#: written into an old-files folder once every old file is in it: the swap's second phase began
TAKEN = ".taken"


def working_folder(out: Path, kind: str) -> Path:
    """A new hidden working folder of ``kind`` (:data:`NEW` or :data:`OLD`) inside ``out``."""
    return Path(tempfile.mkdtemp(dir=out, prefix=kind))


def swap_in(out: Path, staged: Path, record: str) -> None:
    """Move the files of the folder ``staged`` (a working folder inside ``out``) into ``out`` as
    its nasopt files, by renames (see :func:`replace_artifacts`)."""
    out.mkdir(parents=True, exist_ok=True)
    old = working_folder(out, OLD)
    taken: list[str] = []
    placed: list[str] = []
    done = False
    try:
        for name in (*RECORDS, *ARTIFACTS):  # the commit records first: no half-old export
            if (out / name).exists() or (out / name).is_symlink():
                (out / name).replace(old / name)
                taken.append(name)
        _fsync_dir(old)
        (old / TAKEN).write_bytes(b"")  # from here on, a nasopt file in out is a new one
        _fsync_dir(old)
        for name in sorted((p.name for p in staged.iterdir()), key=lambda n: n == record):
            (staged / name).replace(out / name)
            placed.append(name)
        _fsync_dir(out)
        done = True
    except BaseException:
        for name in placed:  # back to the export that was there
            (out / name).unlink(missing_ok=True)
        for name in sorted(taken, key=lambda n: n in RECORDS):
            (old / name).replace(out / name)
        raise
    finally:
        if done or not any(p.name != TAKEN for p in old.iterdir()):  # never the only old copy
            shutil.rmtree(old, ignore_errors=True)


def recover(out: Path) -> None:
    """Undo what a process killed while writing into ``out`` left: a swap's old files go back
    unless its new commit record was already in (then they go), and nasopt's working folders
    and temp files are removed. Another hidden file or folder is never touched.

    An old-files folder without :data:`TAKEN` was killed while taking the old files out: every
    nasopt file still in ``out`` is old too, so its files simply move back. With :data:`TAKEN`
    the new files were coming in: without the new record they are removed and the old ones
    move back; with it the swap is complete."""
    if not out.is_dir():
        return
    for folder in sorted(p for p in out.iterdir() if _WORKING.fullmatch(p.name)):
        if not folder.is_dir() or folder.is_symlink():
            continue
        if folder.name.startswith(OLD):
            kept = [p.name for p in folder.iterdir() if p.name != TAKEN]
            taken = (folder / TAKEN).exists()
            if kept and not (taken and any((out / r).exists() for r in RECORDS)):
                if taken:  # half the new files are in: they go
                    for name in ARTIFACTS:
                        (out / name).unlink(missing_ok=True)
                for name in sorted(kept, key=lambda n: n in RECORDS):
                    (folder / name).replace(out / name)
        shutil.rmtree(folder, ignore_errors=True)
    for name in ARTIFACTS:
        for stale in out.glob(f".{name}.*.tmp"):  # left by a process killed mid-write
            stale.unlink(missing_ok=True)


def stranded(out: Path) -> Path | None:
    """The hidden folder inside ``out`` holding a previous export that a killed swap took out
    (what :func:`recover` puts back), if any: for messages of commands that only read."""
    if not out.is_dir():
        return None
    for folder in sorted(p for p in out.iterdir() if _WORKING.fullmatch(p.name)):
        if folder.name.startswith(OLD) and any(p.name in RECORDS for p in folder.iterdir()):
            return folder
    return None


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def loaders(out: Path) -> list[str]:
    """How to load each model file of the export folder ``out`` (Python expressions), for the
    formats its ``model.json`` lists: only loaders that work on what was written."""
    files = read_card(out).get("files", {})
    found = []
    if "pytorch" in files or "packed" in files:  # load() takes the folder: weights.pt or packed
        found.append(f"nasopt.load({str(out)!r})")
    found += [f"onnxruntime.InferenceSession({str(Path(out) / files[f])!r})"
              for f in ("onnx", "onnx-int8") if f in files]
    return found


def files_of(out: Path) -> list[str]:
    """The files of the export in the folder ``out``: arch.json, model.json and its formats'."""
    files = read_card(out).get("files", {})
    extra = [f for f in C_FILES if "c" in files and f != files["c"]]
    return sorted(["arch.json", "model.json", *files.values(), *extra])


def export_model(model: nn.Module, stored: list[StoredLayer], arch: Arch, space: SearchSpace,
                 out: Path, info: Mapping[str, Any], spaces: Mapping[str, type[SearchSpace]],
                 formats: Sequence[str] = FORMATS, samples: Sequence[Any] | None = None,
                 preprocess: Preprocess | None = None) -> Path:
    """Write the deployed ``model`` of ``arch`` (and its ``stored`` layers) to the folder ``out``.

    ``samples``: (calibration x, verification x, verification y) for the ONNX and C formats
    (training and validation data, as the model takes them: preprocessed); without them ONNX
    files are checked on random inputs, and the C format, which calibrates on them, is
    refused. ``preprocess``: the dataset's (:class:`nasopt.core.data.Preprocess`), recorded in
    ``model.json`` and applied inside the ONNX and C files and by :func:`load`; every file is
    verified on raw samples. ``info`` should say ``weights`` (see the module doc)."""
    unknown = [f for f in formats if f not in ALL_FORMATS]
    if unknown or not formats:
        raise NasoptError(f"unknown export format(s) {unknown}; choose from "
                          f"{', '.join(ALL_FORMATS)}")
    out = check_out(out, force=True)
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    recover(out)
    try:
        _export_into(out, model, stored, arch, space, info, spaces, formats, samples,
                     preprocess)
    except BaseException:
        if created and not any(out.iterdir()):  # nothing of this export is left behind
            out.rmdir()
        raise
    return out


def _export_into(out: Path, model: nn.Module, stored: list[StoredLayer], arch: Arch,
                 space: SearchSpace, info: Mapping[str, Any],
                 spaces: Mapping[str, type[SearchSpace]], formats: Sequence[str],
                 samples: Sequence[Any] | None, preprocess: Preprocess | None) -> None:
    # write and verify in a hidden working folder inside ``out``; only a verified export
    # replaces what was there (files of formats not written this time are removed, never stale)
    with tempfile.TemporaryDirectory(dir=out, prefix=NEW) as tmp_name:
        tmp = Path(tmp_name)
        (tmp / "arch.json").write_text(arch.to_json() + "\n")
        files = {}
        if "pytorch" in formats:
            checkpoint.save({k: v.detach().cpu() for k, v in model.state_dict().items()},
                            tmp / "weights.pt")
            files["pytorch"] = "weights.pt"
        if "packed" in formats:
            (tmp / "model.packed").write_bytes(packed.pack(space, arch, stored))
            files["packed"] = "model.packed"
        deployed = with_preprocess(model, preprocess)  # takes raw samples
        onnx_formats = [f for f in formats if f.startswith("onnx")]
        if onnx_formats:
            from nasopt.deploy import onnx as onnx_export
            raw = ([preprocess.raw(x) if preprocess and i < 2 else x
                    for i, x in enumerate(samples)] if samples else [])
            info = {**info, "onnx": onnx_export.write(deployed, tmp, space.input_shape,
                                                      onnx_formats, *raw)}
            files.update({f: onnx_export.FILES[f] for f in onnx_formats})
        if "c" in formats:  # verified on the host against the NumPy reference, on raw samples
            from nasopt.deploy.firmware import c_export
            if not samples:
                raise NasoptError("the c format calibrates its int8 activations on training "
                                  "samples; export it from a study (`nasopt export STUDY "
                                  "--trial N --format c`) or `nasopt run`")
            verify_x = samples[1].cpu() if len(samples) > 1 else None
            if verify_x is not None and preprocess is not None:
                verify_x = preprocess.raw(verify_x)
            info = {**info, "c": c_export.write(
                tmp, model, stored, space, preprocess, samples[0].cpu(),
                None if verify_x is None else verify_x.numpy())}
            files["c"] = c_export.SOURCE
        card = {"format_version": FORMAT_VERSION, "space": space.describe(), "files": files,
                "packed_bytes": ((tmp / "model.packed").stat().st_size if "packed" in formats
                                 else None), "input": input_record(space, preprocess), **info}
        (tmp / "model.json").write_text(json.dumps(card, indent=2) + "\n")
        for fmt, name in files.items():
            if fmt.startswith("onnx") or fmt == "c":
                continue  # verified by onnx_export.write in ONNX Runtime / c_export.write on
                # the host, on raw samples
            _verify(deployed, load(tmp / name if fmt == "packed" else tmp, spaces), space, name,
                    preprocess)
        # the verified files come in by renames, model.json (the commit record) last; the old
        # export stays whole until they are all in (see replace_artifacts)
        for extra in [p for p in tmp.iterdir() if p.name not in EXPORT_FILES]:
            extra.unlink()
        swap_in(out, tmp, "model.json")


def read_card(folder: str | Path, name: str = "model.json") -> dict[str, Any]:
    """The model card ``name`` of the export (or student) folder ``folder``, checked: a JSON
    object with a ``space`` description. Anything else is one error that names the file."""
    file = Path(folder) / name
    try:
        card = json.loads(file.read_text())
    except FileNotFoundError:
        kept = stranded(Path(folder))
        if kept is not None:
            raise NasoptError(f"{folder} holds no {name}: a command writing into it was "
                              f"stopped midway; its previous export is kept whole in {kept}, "
                              f"and the next `nasopt export` / `finetune` / `run` into "
                              f"{folder} puts it back first") from None
        raise NasoptError(f"{folder} is not a nasopt export (no {name}; an export interrupted "
                          f"while writing leaves none); export one with `nasopt export STUDY "
                          f"--trial N --out DIR`") from None
    except (OSError, ValueError) as exc:
        raise NasoptError(f"{file} is not readable JSON ({exc}); export the model again") from None
    if not isinstance(card, dict) or not isinstance(card.get("space"), dict):
        raise NasoptError(f"{file} is not a nasopt model card (a JSON object with the model's "
                          f"space); export the model again")
    files = card.get("files", {})
    if not isinstance(files, dict):
        raise NasoptError(f"{file}: 'files' is not a table of format -> file; export the model "
                          f"again")
    preprocess_of_card(card)  # a damaged preprocessing record fails here, not in a model
    return card


def load(path: str | Path, spaces: Mapping[str, type[SearchSpace]],
         raw_input: bool = True) -> nn.Module:
    """Load an export: a folder (its weights.pt) or a ``.packed`` file, as a deployed model.

    With ``raw_input`` (the default) the model applies the preprocessing its ``model.json``
    records (:class:`RawInput`), so it takes raw samples; a ``.packed`` file outside an export
    folder has no model card and loads as the bare network. ``raw_input=False``: the bare
    network (it takes preprocessed inputs, as the training code feeds them)."""
    path = Path(path)
    if not path.exists():
        raise NasoptError(f"{path} does not exist; give an export folder or its model.packed "
                          f"(write one with `nasopt export STUDY --trial N --out DIR`)")
    if path.is_file():
        if path.suffix != ".packed" and (path.parent / "model.json").exists():
            raise NasoptError(f"{path} is a file of the export folder {path.parent}; load the "
                              f"folder: nasopt.load({str(path.parent)!r})")
        folder_card = _card_of_packed(path)
        net = packed.read(path, _spaces_of(folder_card, spaces))[0]
        card = folder_card if raw_input else None
        return with_preprocess(net, preprocess_of_card(card)) if card else net
    card = read_card(path)
    spaces = _spaces_of(card, spaces)
    try:
        arch = Arch.load(path / "arch.json")
    except (OSError, ValueError) as exc:
        raise NasoptError(f"{path}: unreadable arch.json ({exc}); export it again") from None

    def wrap(net: nn.Module) -> nn.Module:
        return with_preprocess(net, preprocess_of_card(card)) if raw_input else net

    if not (path / "weights.pt").exists():
        if (path / "model.packed").exists():
            return wrap(packed.read(path / "model.packed", spaces)[0])
        raise NasoptError(f"{path} holds no weights.pt or model.packed; export it again")
    space = space_from_description(card["space"], spaces)
    model = compressed_structure(space.build(arch), Policy.from_arch(arch), space.group_of)
    try:
        model.load_state_dict(checkpoint.load(path / "weights.pt"))
    except RuntimeError as exc:
        raise NasoptError(f"{path}/weights.pt does not match arch.json ({str(exc)[:200]}); "
                          f"export it again") from None
    return wrap(model.eval())


def _spaces_of(card: Mapping[str, Any] | None, spaces: Mapping[str, type[SearchSpace]]
               ) -> Mapping[str, type[SearchSpace]]:
    """``spaces`` plus the user's space a model card records by import spec (a packed file names
    its space only by name)."""
    desc = (card or {}).get("space") or {}
    if not desc.get("import"):
        return spaces
    from nasopt.core.space_import import load_space_class
    return {**{name: spaces[name] for name in spaces},
            desc["name"]: load_space_class(str(desc["import"]))}


def _card_of_packed(path: Path) -> dict[str, Any] | None:
    """The model card of the export folder holding the packed file ``path``, if any."""
    if not (path.parent / "model.json").exists():
        return None
    card = read_card(path.parent)  # a damaged card next to the file is an error, not ignored
    return card if card.get("files", {}).get("packed") == path.name else None


@torch.no_grad()
def _verify(model: nn.Module, loaded: nn.Module, space: SearchSpace, name: str,
            preprocess: Preprocess | None = None) -> None:
    """``loaded`` against the in-memory ``model`` (both taking raw samples) on random raw
    samples: model inputs drawn at random, turned into the raw samples they come from."""
    device = next(model.parameters()).device
    x = torch.randn((8, *space.input_shape), generator=torch.Generator().manual_seed(0))
    if preprocess is not None:
        x = preprocess.raw(x)
    model.eval()
    diff = (model(x.to(device)).cpu() - loaded(x)).abs().max().item()
    if diff > TOLERANCE:
        raise RuntimeError(f"export verification of {name} failed: outputs differ by {diff}")
