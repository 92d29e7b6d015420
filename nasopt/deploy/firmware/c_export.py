"""An integer plan (:mod:`nasopt.deploy.firmware.reference`) as C: ``model.h`` and ``model.c``.

C99, no dynamic memory, nothing beyond ``<stdint.h>`` / ``<stddef.h>``:

- weights as ``const uint8_t`` arrays at their bit-width (the packed file's bit order: value after
  value, least significant bit first), a sparse layer's kept values plus a one-bit-per-weight
  mask; int32 biases, a multiplier (int32) and a shift (uint8) per output channel;
- the kernels the model uses (``kernels.c``, copied in) and the model as a table of steps
  (``nq_steps``: kernel, layer record, arena offsets; ``nq_in``: the input quantization) walked
  by ``nq_predict``: every model-dependent number is data, so each function's machine code is
  the same in every model and the flash is predictable (:mod:`nasopt.deploy.firmware.footprint`);
- one static activation arena (``NASOPT_ARENA_BYTES``), laid out by :func:`plan_arena`: every
  int8 tensor gets an offset such that tensors alive at the same op never overlap, a residual add
  writes in place over an input it is the last reader of. The network's input (after
  quantization) lives in the arena too; the logits are written to the caller's buffer.
  ``arena_bytes`` is compared with nasopt's peak-SRAM analysis (:mod:`nasopt.hardware.memory`,
  a lower bound: the largest sum of live tensors) in ``firmware.json``.

``model.h`` defines ``NASOPT_INPUT_SIZE`` (floats per sample), ``NASOPT_NUM_CLASSES``,
``NASOPT_LOGIT_SCALE`` (a logit times it is the float logit, approximately) and declares
``int nasopt_predict(const float *x)`` and ``void nasopt_logits(const float *x, int32_t *out)``:
one raw sample as the data file gives it (C order), the dataset's preprocessing applied inside.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from nasopt.compression.packed import _pack_ints
from nasopt.core.errors import NasoptError

HEADER = "model.h"
SOURCE = "model.c"
EMIT_KINDS = {"1d": "nq_conv1d", "pw": "nq_pointwise", "2d": "nq_conv2d", "dw": "nq_dwconv2d"}
FLAGS = {"1d": "NQ_USE_CONV1D", "pw": "NQ_USE_POINTWISE", "2d": "NQ_USE_CONV2D", "dw": "NQ_USE_DW"}


def kernel_of(op: Mapping[str, Any]) -> str:
    """The kernel of a conv op: a 1-D op without a window (k = 1, stride 1, no padding: a linear
    layer or a pointwise conv) runs the pointwise kernel."""
    if op["kind"] == "1d" and op["k"] == 1 and op["stride"] == 1 and op["pad"] == 0:
        return "pw"
    return op["kind"]


# ---- the arena ------------------------------------------------------------------------------
def lifetimes(plan: Mapping[str, Any]) -> tuple[list[int], list[list[int]]]:
    """(buffer of each tensor, [bytes, first op, last op] per buffer); op -1 is the input
    quantization. A residual add shares the buffer of an input it is the last reader of."""
    ops, tensors = plan["ops"], plan["tensors"]
    last_read = {t: -1 for t in range(len(tensors))}
    for i, op in enumerate(ops):
        for t in _inputs(op):
            last_read[t] = max(last_read[t], i)
    buffer_of = {0: 0}
    buffers = [[tensors[0]["bytes"], -1, last_read[0]]]
    for i, op in enumerate(ops):
        out = op["out"]
        if out == plan["output"]:
            continue  # the caller's int32 buffer
        shared = None
        if op["op"] == "add":
            shared = next((buffer_of[t] for t in (op["a"], op["b"])
                           if last_read[t] == i and tensors[t]["bytes"] == tensors[out]["bytes"]
                           and buffers[buffer_of[t]][2] == i), None)
        if shared is None:
            buffer_of[out] = len(buffers)
            buffers.append([tensors[out]["bytes"], i, max(i, last_read[out])])
        else:
            buffer_of[out] = shared
            buffers[shared][2] = max(i, last_read[out])
    return [buffer_of.get(t, -1) for t in range(len(tensors))], buffers


def _inputs(op: Mapping[str, Any]) -> list[int]:
    return [op["a"], op["b"]] if op["op"] == "add" else [op["in"]]


def plan_arena(plan: Mapping[str, Any]) -> tuple[list[int], int, int]:
    """(offset of each tensor in the arena, -1 for the logits; arena bytes; the largest sum of
    tensors alive at one op, a lower bound of any arena). Greedy: the largest buffer first, each
    at the lowest offset clear of every placed buffer alive at the same time."""
    buffer_of, buffers = lifetimes(plan)
    order = sorted(range(len(buffers)), key=lambda b: (-buffers[b][0], buffers[b][1]))
    offset: dict[int, int] = {}
    for b in order:
        size, start, end = buffers[b]
        busy = sorted((offset[o], offset[o] + buffers[o][0]) for o in offset
                      if buffers[o][1] <= end and start <= buffers[o][2])
        at = 0
        for lo, hi in busy:
            if at + size <= lo:
                break
            at = max(at, hi)
        offset[b] = at
    arena = max((offset[b] + buffers[b][0] for b in offset), default=0)
    peak = max(sum(s for s, a, e in buffers if a <= i <= e)
               for i in range(-1, len(plan["ops"])))
    return [offset[b] if b >= 0 else -1 for b in buffer_of], arena, peak


# ---- C text ---------------------------------------------------------------------------------
def _array(ctype: str, name: str, values: Sequence[int], per_line: int = 16) -> str:
    vals = [str(int(v)) for v in values] or ["0"]
    lines = [", ".join(vals[i:i + per_line]) for i in range(0, len(vals), per_line)]
    return f"static const {ctype} {name}[{len(vals)}] = {{\n    " + ",\n    ".join(lines) + "\n};\n"


def _float(v: float) -> str:
    """The float32 value ``v`` as an exact C hexadecimal float literal."""
    return float(np.float32(v)).hex() + "f"


def weight_bytes(op: Mapping[str, Any]) -> tuple[bytes, bytes | None]:
    """(kept values packed at the op's bits, the mask bits or None) of a conv op."""
    q = np.asarray(op["q"], np.int64).reshape(-1)
    mask = None
    if op["mask"] is not None:
        keep = np.asarray(op["mask"], bool).reshape(-1)
        mask = np.packbits(keep.astype(np.uint8), bitorder="little").tobytes()
        q = q[keep]
    if op["bits"] == 8:
        values = (q & 0xFF).astype(np.uint8).tobytes()
    else:
        values = _pack_ints(q, op["bits"]) if len(q) else b""
    return values, mask


def row_length(op: Mapping[str, Any]) -> int:
    k = op["k"]
    return {"1d": op["cin"] * k, "2d": op["cin"] * k * k, "dw": k * k}[op["kind"]]


def generate(plan: Mapping[str, Any]) -> dict[str, str]:
    """``{"model.h": ..., "model.c": ...}`` for ``plan``."""
    offsets, arena, peak = plan_arena(plan)
    tensors, ops = plan["tensors"], plan["ops"]
    for op in ops:  # the kernels' uint16 fields
        big = [f for f in ("cin", "cout", "k", "in_len", "out_len", "in_h", "in_w", "out_h",
                           "out_w", "channels") if op.get(f, 0) > 65535]
        if big:
            raise NasoptError(f"the C export cannot emit layer {op.get('name')}: its {big[0]} "
                              f"is {op[big[0]]}, above the kernels' 65535")
    input_size = math.prod(plan["input_shape"])
    kinds = {kernel_of(op) for op in ops if op["op"] == "conv"}
    uses = sorted({FLAGS[k] for k in kinds}
                  | {"NQ_USE_ADD" for op in ops if op["op"] == "add"}
                  | {"NQ_USE_MEAN" for op in ops if op["op"] == "mean"}
                  | {"NQ_USE_MAXPOOL" for op in ops if op["op"] == "maxpool"})
    max_row = max((row_length(op) for op in ops if op["op"] == "conv"), default=1)
    kernels = resources.files("nasopt.deploy.firmware").joinpath("kernels.c").read_text()
    inp = plan["input"]
    pre = inp["preprocess"]
    applied = ("no preprocessing" if pre["mean"] == 0 and pre["std"] == 1 else
               f"the preprocessing (x - {pre['mean']:g}) / {pre['std']:g} is applied inside")
    header = f"""/* nasopt: the {plan['space']} model as integer C (generated by nasopt export --format c).
 * int nasopt_predict(const float *x): the class of one raw sample (NASOPT_INPUT_SIZE floats,
 *   C order of the input shape {tuple(plan['input_shape'])}, as the data file gives it; {applied}).
 * void nasopt_logits(const float *x, int32_t *out): NASOPT_NUM_CLASSES int32 logits;
 *   out[i] * NASOPT_LOGIT_SCALE approximates the float model's logit i.
 * Static memory only: one int8 arena of NASOPT_ARENA_BYTES; not reentrant. */
#ifndef NASOPT_MODEL_H
#define NASOPT_MODEL_H

#include <stdint.h>

#define NASOPT_INPUT_SIZE {input_size}
#define NASOPT_NUM_CLASSES {plan['num_classes']}
#define NASOPT_ARENA_BYTES {arena}
#define NASOPT_LOGIT_SCALE {plan['logit_scale']!r}f

#ifdef __cplusplus
extern "C" {{
#endif

int nasopt_predict(const float *x);
void nasopt_logits(const float *x, int32_t *out);

#ifdef __cplusplus
}}
#endif

#endif /* NASOPT_MODEL_H */
"""
    parts = [f"/* nasopt: the {plan['space']} model as integer C (generated by nasopt export "
             f"--format c). Arena: {arena} bytes (the largest sum of tensors alive at one op: "
             f"{peak}). */\n",
             '#include "model.h"\n#include <stddef.h>\n\n',
             "".join(f"#define {u}\n" for u in uses), f"#define NQ_MAX_ROW {max_row}\n\n",
             kernels, "\n"]
    steps = []  # (kernel, layer record, x, x2, y)
    for i, op in enumerate(ops):
        comment = f"/* op {i}: {op['op']} {op.get('layer', op.get('name', ''))} */\n"
        if op["op"] == "conv":
            values, mask = weight_bytes(op)
            parts.append(comment)
            parts.append(_array("uint8_t", f"w{i}", values))
            if mask is not None:
                parts.append(_array("uint8_t", f"m{i}", mask))
            parts.append(_array("int32_t", f"b{i}", op["bias"], 8))
            parts.append(_array("int32_t", f"q{i}", op["mult"], 8))
            parts.append(_array("uint8_t", f"s{i}", op["shift"]))
            h_in, w_in = (op["in_h"], op["in_w"]) if op["kind"] != "1d" else (1, op["in_len"])
            h_out, w_out = (op["out_h"], op["out_w"]) if op["kind"] != "1d" else (1, op["out_len"])
            zp_out = 0 if op["logits"] else tensors[op["out"]]["zp"]
            fields = [f"w{i}", f"m{i}" if mask is not None else "NULL", f"b{i}", f"q{i}",
                      f"s{i}", op["cin"], op["cout"], op["k"], op["stride"], op["pad"], h_in,
                      w_in, h_out, w_out, tensors[op["in"]]["zp"], zp_out, op["act_min"],
                      op["act_max"], op["bits"], int(op["logits"])]
            parts.append(f"static const nq_conv_t L{i} = {{{', '.join(map(str, fields))}}};\n\n")
            steps.append((EMIT_KINDS[kernel_of(op)], f"&L{i}", offsets[op["in"]], 0,
                          "NQ_LOGITS" if op["logits"] else offsets[op["out"]]))
        elif op["op"] == "add":
            ta, tb, to = (tensors[op[k]] for k in ("a", "b", "out"))
            fields = [to["bytes"], ta["zp"], tb["zp"], to["zp"], op["mult_a"], op["mult_b"],
                      op["shift"], op["act_min"], op["act_max"]]
            parts.append(comment + f"static const nq_add_t L{i} = "
                                   f"{{{', '.join(map(str, fields))}}};\n\n")
            steps.append(("nq_add", f"&L{i}", offsets[op["a"]], offsets[op["b"]],
                          offsets[op["out"]]))
        elif op["op"] == "maxpool":
            fields = [op["channels"], op["in_h"], op["in_w"], op["out_h"], op["out_w"], op["k"],
                      op["stride"], op["pad"], op["act_min"], op["act_max"]]
            parts.append(comment + f"static const nq_maxpool_t L{i} = "
                                   f"{{{', '.join(map(str, fields))}}};\n\n")
            steps.append(("nq_maxpool", f"&L{i}", offsets[op["in"]], 0, offsets[op["out"]]))
        else:
            fields = [op["channels"], op["spatial"], tensors[op["in"]]["zp"],
                      tensors[op["out"]]["zp"], op["mult"], op["shift"]]
            parts.append(comment + f"static const nq_mean_t L{i} = "
                                   f"{{{', '.join(map(str, fields))}}};\n\n")
            steps.append(("nq_mean", f"&L{i}", offsets[op["in"]], 0, offsets[op["out"]]))
    if not ops or not ops[-1].get("logits"):
        raise NasoptError("the C export needs the last op to write the logits")
    rows = [f"    {{{run}, {layer}, {a}, {b}, {y}}}," for run, layer, a, b, y in steps]
    parts.append(f"static const nq_input_t nq_in = {{{_float(inp['a'])}, {_float(inp['c'])}, "
                 f"NASOPT_INPUT_SIZE, {offsets[0]}, NASOPT_NUM_CLASSES}};\n"
                 f"static const nq_step_t nq_steps[{len(steps) + 1}] = {{\n" + "\n".join(rows)
                 + "\n    {NULL, NULL, 0, 0, 0}\n};\n\n" + GLUE)
    return {HEADER: header, SOURCE: "".join(parts)}


#: the model's entry points (their code does not depend on the model: see kernels.c)
GLUE = """static int8_t arena[NASOPT_ARENA_BYTES];
static int32_t nq_logits[NASOPT_NUM_CLASSES];

void nasopt_logits(const float *x, int32_t *out)
{
    (void)nq_predict(&nq_in, nq_steps, x, out, arena);
}

int nasopt_predict(const float *x)
{
    return nq_predict(&nq_in, nq_steps, x, nq_logits, arena);
}
"""


def summary(plan: Mapping[str, Any]) -> dict[str, Any]:
    """What ``firmware.json`` records about the C: arena, weights, layers."""
    _, arena, peak = plan_arena(plan)
    convs = [op for op in plan["ops"] if op["op"] == "conv"]
    weight = sum(len(weight_bytes(op)[0]) + len(weight_bytes(op)[1] or b"") for op in convs)
    per_channel = sum(9 * op["cout"] for op in convs)  # bias, multiplier, shift
    return {"arena_bytes": arena, "live_peak_bytes": peak, "weight_bytes": weight,
            "per_channel_bytes": per_channel,
            "bits": sorted({op["bits"] for op in convs}),
            "sparse_layers": sum(op["mask"] is not None for op in convs),
            "ops": [op["op"] if op["op"] != "conv" else f"conv{op['kind']}" for op in plan["ops"]]}


PLAN = "model.plan.json"
FILES = (HEADER, SOURCE, PLAN)


def write(folder: Path, model: Any, stored: Sequence[Any], space: Any, preprocess: Any,
          calib_x: Any, verify_x: Any) -> dict[str, Any]:
    """Write ``model.h``, ``model.c`` and the plan (``model.plan.json``) of the deployed ``model``
    into ``folder``, calibrated on ``calib_x`` (training samples, preprocessed), and verify them:
    the host build's logits of ``verify_x`` (raw samples) must equal the NumPy reference's bit
    for bit. Returns the model card's ``c`` record."""
    from nasopt.deploy.firmware import reference, toolchain
    if calib_x is None or len(calib_x) == 0:
        raise NasoptError("the C export calibrates its activation ranges on training samples; "
                          "none were given")
    plan = reference.build_plan(model, stored, space, preprocess, calib_x)
    for name, text in generate(plan).items():
        (Path(folder) / name).write_text(text)
    reference.save(plan, Path(folder) / PLAN)
    record = summary(plan)
    if verify_x is not None and len(verify_x):
        x = np.asarray(verify_x, np.float32)
        ref = reference.run(plan, x)
        host = toolchain.host_logits(folder, x, plan["num_classes"])
        if not np.array_equal(ref, host):
            bad = int((ref != host).any(axis=1).sum())
            raise RuntimeError(f"export verification of model.c failed: the host build's "
                               f"logits differ from the NumPy reference on {bad} of {len(x)} "
                               f"samples")
        with_float = getattr(model, "eval", None)
        record["verified"] = {"samples": len(x), "host_equals_reference": True}
        if with_float is not None:
            import torch
            with torch.no_grad():
                pre = torch.as_tensor(x) if preprocess is None else preprocess.apply(
                    torch.as_tensor(x))
                float_cls = model.eval()(pre).argmax(1).numpy()
            record["verified"]["class_agreement_with_float"] = float(
                (ref.argmax(1) == float_cls).mean())
    record["note"] = ("int8 activations, weights at the arch's bit-widths (float32 layers as "
                      "8-bit), int32 accumulators; build with -ffp-contract=off")
    return record
