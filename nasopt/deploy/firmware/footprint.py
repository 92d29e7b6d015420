"""Flash and RAM of a C export (:mod:`nasopt.deploy.firmware.c_export`) on a Cortex-M4, predicted
from its plan without compiling.

The generated ``model.c`` keeps every model-dependent number in data (weights, per-channel
records, layer records, the step table ``nq_steps``, the input record ``nq_in``) and its code in
functions whose machine code does not depend on the model or on which other kernels are compiled
in (see ``kernels.c``). So, with a *cost table* measured once with the cross-compiler
(:func:`measure_costs`: the bytes of each function's code, of each record type, each function's
stack frame):

- **flash** = the code of the functions the model uses (its kernels, ``nq_row`` when it has a
  conv, ``nq_input``, ``nq_predict``, ``nasopt_predict``; ``nasopt_logits``, 36 bytes, only when
  the application calls it, see :data:`LINKED`) + the bytes of its
  constant arrays and records, exactly what :func:`nasopt.deploy.firmware.toolchain.m4_sizes`
  measures from the link map (``flash``: model.o's input sections, alignment padding between
  them not counted, plus library routines, of which the kernels call none);
- **static RAM** = the arena (:func:`~nasopt.deploy.firmware.c_export.plan_arena`) + the decoded
  weight row (``NQ_MAX_ROW`` bytes, when the model has a conv) + the int32 logits, exactly the
  measured ``.data + .bss``;
- **stack** = the deepest call chain of frames from GCC's ``-fstack-usage`` (``nasopt_predict``,
  ``nq_predict``, then ``nq_input`` or the deepest kernel with ``nq_row``). It equalled the
  stack high-water mark painted in QEMU (``toolchain.m4_run``) in every run measured
  (results/firmware.md). In general it is an upper bound: painting cannot see a frame slot that
  is never written.

The table is valid for the compiler and flags it records; :func:`measure_costs` rebuilds it.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from typing import Any

from nasopt.core.errors import NasoptError

#: the functions every model has
GLUE = ("nq_input", "nq_predict", "nasopt_logits", "nasopt_predict")
#: an application that calls nasopt_predict only (as the QEMU harness does) links these; the
#: linker drops nasopt_logits (``--gc-sections``), which adds ``code["nasopt_logits"]`` bytes
#: (36 with the shipped table) when called too
LINKED = ("nq_input", "nq_predict", "nasopt_predict")
KERNELS = ("nq_conv1d", "nq_pointwise", "nq_conv2d", "nq_dwconv2d", "nq_add", "nq_mean",
           "nq_maxpool")
RECORDS = ("nq_conv_t", "nq_add_t", "nq_mean_t", "nq_maxpool_t", "nq_input_t", "nq_step_t")
#: the kernels that are not convolutions (no weight row): one per plan op of the same name
OTHER_KERNELS = ("nq_add", "nq_mean", "nq_maxpool")
CONV_KERNELS = KERNELS[:4]


def functions_of(plan: Mapping[str, Any]) -> list[str]:
    """The C functions of ``plan``'s model.c that an image calling ``nasopt_predict`` holds."""
    from nasopt.deploy.firmware.c_export import EMIT_KINDS, kernel_of
    used = {EMIT_KINDS[kernel_of(op)] for op in plan["ops"] if op["op"] == "conv"}
    used |= {f"nq_{op['op']}" for op in plan["ops"] if f"nq_{op['op']}" in OTHER_KERNELS}
    if used & set(CONV_KERNELS):
        used.add("nq_row")
    return sorted(used | set(LINKED))


def data_bytes(plan: Mapping[str, Any], records: Mapping[str, int]) -> dict[str, int]:
    """Bytes of model.c's constant data by kind: ``weights`` (packed values; an empty array is
    one byte), ``masks``, ``per_channel`` (int32 bias and multiplier, uint8 shift per output
    channel), ``records`` (layer records, ``nq_in``, ``nq_steps`` with its end marker)."""
    from nasopt.deploy.firmware.c_export import weight_bytes
    weights = masks = per_channel = 0
    layer = records["nq_input_t"] + records["nq_step_t"] * (len(plan["ops"]) + 1)
    for op in plan["ops"]:
        if op["op"] == "conv":
            values, mask = weight_bytes(op)
            weights += max(1, len(values))
            masks += len(mask) if mask is not None else 0
            per_channel += 9 * op["cout"]
            layer += records["nq_conv_t"]
        else:
            layer += records[f"nq_{op['op']}_t"]
    return {"weights": weights, "masks": masks, "per_channel": per_channel, "records": layer}


def predict(plan: Mapping[str, Any], costs: Mapping[str, Any]) -> dict[str, Any]:
    """Flash, RAM and their parts of ``plan``'s model.c under the cost table ``costs``."""
    from nasopt.deploy.firmware.c_export import plan_arena, row_length
    funcs = functions_of(plan)
    code = sum(costs["code"][f] for f in funcs)
    data = data_bytes(plan, costs["records"])
    arena = plan_arena(plan)[1]
    convs = [op for op in plan["ops"] if op["op"] == "conv"]
    row = max((row_length(op) for op in convs), default=1) if convs else 0
    static = arena + row + 4 * plan["num_classes"]
    frames = costs["stack"]
    deepest = max([frames["nq_input"]]
                  + [frames[f] + frames["nq_row"] for f in funcs if f in CONV_KERNELS]
                  + [frames[f] for f in funcs if f in OTHER_KERNELS])
    stack = frames["nasopt_predict"] + frames["nq_predict"] + deepest
    flash = code + sum(data.values())
    return {"flash_bytes": flash, "code_bytes": code, "data_bytes": data,
            "ram_bytes": static + stack, "static_ram_bytes": static, "arena_bytes": arena,
            "stack_bytes": stack, "functions": funcs}


def flash_floor(costs: Mapping[str, Any]) -> int:
    """A lower bound of any model's flash: the entry points and input quantization, the
    cheapest kernel with one record and its step (plus the table's end), one byte of weights."""
    records = costs["records"]
    layer = min([costs["code"][k] + costs["code"]["nq_row"] + records["nq_conv_t"] + 1 + 9
                 for k in CONV_KERNELS])
    return (sum(costs["code"][f] for f in LINKED) + records["nq_input_t"]
            + 2 * records["nq_step_t"] + layer)


# ---- the cost table -------------------------------------------------------------------------
def load_costs(path: str | Path) -> dict[str, Any]:
    try:
        costs = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise NasoptError(f"cannot read the Cortex-M4 cost table {path}: {exc}") from None
    missing = [f for f in (*GLUE, *KERNELS, "nq_row") if f not in costs.get("code", {})]
    missing += [r for r in RECORDS if r not in costs.get("records", {})]
    if missing:
        raise NasoptError(f"the cost table {path} lacks {', '.join(missing)}; rebuild it with "
                          f"nasopt.deploy.firmware.footprint.measure_costs")
    return costs


def _probe_source() -> str:
    """Every kernel compiled in, the glue, one record of each type: the code of each function
    and the size of each record, independent of any model."""
    from nasopt.deploy.firmware.c_export import GLUE as glue
    kernels = resources.files("nasopt.deploy.firmware").joinpath("kernels.c").read_text()
    flags = "".join(f"#define {f}\n" for f in ("NQ_USE_CONV1D", "NQ_USE_POINTWISE",
                                                "NQ_USE_CONV2D", "NQ_USE_DW", "NQ_USE_ADD",
                                                "NQ_USE_MEAN", "NQ_USE_MAXPOOL"))
    probes = "".join(f"const {r} nq_probe_{r};\n" for r in RECORDS)
    return ("#include <stdint.h>\n#include <stddef.h>\n" + flags
            + "#define NQ_MAX_ROW 1\n#define NASOPT_ARENA_BYTES 1\n#define NASOPT_NUM_CLASSES 1\n"
            + kernels + "\nstatic const nq_input_t nq_in;\nstatic const nq_step_t nq_steps[1];\n"
            + glue + "const nq_kernel_t nq_probe_kernels[] = {" + ", ".join(KERNELS) + "};\n"
            + probes)


def measure_costs(cc: str = "arm-none-eabi-gcc") -> dict[str, Any]:
    """The cost table, measured by compiling :func:`_probe_source` with ``cc`` and the
    Cortex-M4 flags of :mod:`nasopt.deploy.firmware.toolchain` (``-fstack-usage`` added)."""
    from nasopt.deploy.firmware.toolchain import APT, M4_FLAGS, ToolchainMissing
    tools = (cc, "arm-none-eabi-size", "arm-none-eabi-nm")
    if any(shutil.which(t) is None for t in tools):
        raise ToolchainMissing(f"{cc} or binutils not found: install the Cortex-M4 toolchain: "
                               f"{APT}")
    with tempfile.TemporaryDirectory(prefix="nasopt-cost-") as tmp_name:
        tmp = Path(tmp_name)
        (tmp / "probe.c").write_text(_probe_source())
        run = lambda *cmd: subprocess.run(cmd, cwd=tmp, capture_output=True, text=True,  # noqa: E731
                                          check=True).stdout
        try:
            run(cc, *M4_FLAGS, "-fstack-usage", "-c", "probe.c", "-o", "probe.o")
        except subprocess.CalledProcessError as exc:
            raise NasoptError(f"compiling the cost probe failed: {exc.stderr[-600:]}") from None
        version = run(cc, "--version").splitlines()[0]
        sections = {}
        for line in run("arm-none-eabi-size", "-A", "probe.o").splitlines():
            parts = line.split()
            if len(parts) == 3 and parts[0].startswith(".") and parts[1].isdigit():
                sections[parts[0]] = int(parts[1])
        undefined = [u for u in run("arm-none-eabi-nm", "-u", "probe.o").split() if u != "U"]
        stack_lines = (tmp / "probe.su").read_text().splitlines()
    if undefined:
        raise NasoptError(f"the kernels call library routines ({', '.join(undefined)}): the "
                          f"cost table does not model them")
    code: dict[str, int] = {}
    records: dict[str, int] = {}
    for name, size in sections.items():
        if name.startswith(".text.") and size:
            code[name[len(".text."):]] = size
        elif name.startswith((".rodata.nq_probe_", ".bss.nq_probe_")):
            key = name.split("nq_probe_", 1)[1]
            if key in RECORDS:
                records[key] = size
        elif size and name.startswith((".text", ".rodata", ".data")) and \
                name not in (".rodata.nq_probe_kernels", ".rodata.nq_steps", ".rodata.nq_in"):
            raise NasoptError(f"the cost probe has a section {name} ({size} B) that the cost "
                              f"table does not attribute")
    stack = {}
    for line in stack_lines:
        where, frame, kind = line.split("\t")
        stack[where.rsplit(":", 1)[-1]] = int(frame)
    unknown = set(code) - {*GLUE, *KERNELS, "nq_row"}
    if unknown:
        raise NasoptError(f"the cost probe compiled functions the table does not know: "
                          f"{', '.join(sorted(unknown))}")
    from nasopt.deploy.firmware.toolchain import M4_FLAGS as flags
    return {"compiler": version, "flags": flags, "code": dict(sorted(code.items())),
            "records": records, "stack": dict(sorted(stack.items())), "library_bytes": 0}
