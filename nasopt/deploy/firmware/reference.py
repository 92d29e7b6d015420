"""The integer semantics of a deployed model on a microcontroller, defined once.

A **plan** (a JSON-serializable dict, :func:`build_plan`) describes the deployed network as
integer ops; :func:`run` executes it with NumPy, and :mod:`nasopt.deploy.firmware.c_export`
writes the same plan as C. Both must give the same int32 logits, bit for bit.

Numbers:

- **Weights** keep the arch's searched bit-width (2/4/6/8) and per-output-channel scales, exactly
  the integers of the packed file (:mod:`nasopt.compression.packed`); a float32 (32-bit) layer,
  and a codebook layer (decoded), is quantized to 8 bits per output channel (symmetric, as the
  packed file quantizes): the firmware stores a codebook layer as 8-bit weights. Sparse layers
  keep their zeros; low-rank pairs are two layers.
- **Activations** are int8, asymmetric per tensor (``real = scale * (q - zero_point)``), their
  ranges calibrated (min/max) on training samples only. ReLU/ReLU6 are fused into the producing
  op as a clamp.
- **Accumulators** are int32: ``acc = bias_q[c] + sum((x - zp_in) * w)``, with
  ``bias_q = round(bias / (s_in * s_w[c]))``; padding contributes nothing.
- **Requantization** is fixed point, a multiplier and a shift per output channel:
  ``y = zp_out + ((acc * M[c] + 2^(R[c]-1)) >> R[c])`` in 64-bit, ``M`` < 2^31, then clamped to
  the activation's range. ``M * 2^-R`` approximates ``s_in * s_w[c] / s_out``.
- **Residual add**: ``y = zp + (((a - zp_a) * A + (b - zp_b) * B + 2^(S-1)) >> S)`` in int32
  with ``A, B < 2^21``; **mean pooling**: the int32 sum of ``x - zp`` requantized as above.
- **Input**: the dataset's preprocessing ``(x - mean) / std`` and the input quantization fold
  into two float32 constants: ``u = x * a; u = u + c`` (two IEEE float32 operations, never
  fused), clamped to [0, 511] (NaN: 0), truncated to an integer, minus 256, clamped to int8.
- **Logits**: the last layer's accumulators requantized per class to one common scale
  (``logit_scale``) as int32, not clamped to int8; the class is the first index of the maximum.

Arithmetic right shifts of negative numbers are assumed (GCC on every target it supports).
"""
from __future__ import annotations

import json
import math
import operator
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from nasopt.compression import packed
from nasopt.compression.compress import FLOAT_BITS, StoredLayer, quantize
from nasopt.core.data import Preprocess
from nasopt.core.errors import NasoptError
from nasopt.core.space import SearchSpace

PLAN_VERSION = 1
#: bits a layer is stored with on the microcontroller when the arch keeps it float32
FLOAT_LAYER_BITS = 8
#: int32 logits resolve the calibrated logit range to this many steps
LOGIT_STEPS = 2 ** 20
#: the residual add's multipliers stay below 2^ADD_BITS (the int32 sum cannot overflow)
ADD_BITS = 21
CALIB_SAMPLES = 1000

_ALIAS_FUNCTIONS = {torch.flatten, torch.reshape, torch.squeeze, torch.unsqueeze}
_ALIAS_METHODS = {"view", "reshape", "flatten", "squeeze", "unsqueeze", "contiguous"}
_ALIAS_MODULES = (nn.Identity, nn.Dropout, nn.Flatten)
_RELU = {F.relu: "relu", torch.relu: "relu", F.relu6: "relu6"}
_RELU_MODULES = {nn.ReLU: "relu", nn.ReLU6: "relu6"}
_ADD = {operator.add, torch.add, operator.iadd}
EMITS = ("Conv1d, Conv2d (dense or depthwise), Linear, ReLU/ReLU6 after them, residual add, "
         "2-D max pooling (square windows, no dilation), mean pooling over the spatial dims and "
         "reshapes")


# ---- the packed file's integers -------------------------------------------------------------
def read_packed(path: str | Path, spaces: Mapping[str, type[SearchSpace]]
                ) -> tuple[SearchSpace, Any, nn.Module, list[StoredLayer]]:
    """(space, arch, deployed model, stored layers) of a packed file: the integers and scales
    exactly as stored (the loaded model holds them dequantized)."""
    return packed.unpack_stored(Path(path).read_bytes(), spaces)


def _integer_weights(layer: StoredLayer) -> tuple[np.ndarray, np.ndarray, int, np.ndarray | None]:
    """(integers, float scale per output channel, bits, kept mask or None) of a stored layer;
    a float32 layer, and a codebook layer (its decoded weights: the C code holds integers with a
    scale per output channel, not codebooks), is quantized to :data:`FLOAT_LAYER_BITS` here."""
    w = layer.weight
    mask = None if w.mask is None else w.mask.numpy().astype(bool)
    if w.bits < FLOAT_BITS and w.codebook is None:
        return w.q.numpy().astype(np.int64), w.scale.numpy().astype(np.float64), w.bits, mask
    q, scale = quantize(w.dense(), FLOAT_LAYER_BITS)
    return (q.numpy().astype(np.int64), scale.numpy().astype(np.float64), FLOAT_LAYER_BITS,
            mask)


# ---- fixed point ----------------------------------------------------------------------------
def multiplier(real: float) -> tuple[int, int]:
    """(M, R) with M < 2^31 and M * 2^-R closest to ``real`` (> 0) at 31 bits; 1 <= R <= 62."""
    if not real > 0:
        return 0, 1
    mant, exp = math.frexp(real)  # real = mant * 2^exp, 0.5 <= mant < 1
    m, r = round(mant * 2 ** 31), 31 - exp
    if m == 2 ** 31:
        m, r = 2 ** 30, r - 1
    if r > 62:
        m, r = round(m / 2 ** (r - 62)), 62
    if r < 1:
        raise NasoptError(f"a requantization scale of {real:g} is too large for int32 fixed "
                          f"point; the model's activations are out of range")
    return int(m), int(r)


def requantize(acc: np.ndarray, m: np.ndarray, r: np.ndarray) -> np.ndarray:
    """``(acc * m + 2^(r-1)) >> r`` in int64 (``m``, ``r`` broadcast over the channel axis 1)."""
    shape = (1, -1) + (1,) * (acc.ndim - 2)
    m = np.asarray(m, np.int64).reshape(shape)
    r = np.asarray(r, np.int64).reshape(shape)
    return (acc.astype(np.int64) * m + (np.int64(1) << (r - 1))) >> r


def quant_params(lo: float, hi: float) -> tuple[float, int]:
    """(scale, zero point) of int8 for the real range [lo, hi] (widened to hold 0)."""
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    if hi - lo < 1e-12:
        hi = lo + 1e-6
    scale = (hi - lo) / 255.0
    zp = int(np.clip(round(-128 - lo / scale), -128, 127))
    return scale, zp


class PlanInput(NamedTuple):
    """What :func:`build_plan` reads of a search space, for a model that is not one of a
    space's archs (a fixed network): its name in the plan, the input shape of one sample
    (without the batch dim) and the number of classes."""
    name: str
    input_shape: tuple[int, ...]
    num_classes: int


# ---- the graph --------------------------------------------------------------------------------
class _Recorder(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule):
        super().__init__(gm)
        self.ranges: dict[str, list[float]] = {}

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        if isinstance(out, torch.Tensor) and out.is_floating_point():
            lo, hi = float(out.min()), float(out.max())
            seen = self.ranges.setdefault(n.name, [lo, hi])
            seen[0], seen[1] = min(seen[0], lo), max(seen[1], hi)
        return out


def _unsupported(node: fx.Node, what: str) -> NasoptError:
    return NasoptError(f"the C export cannot emit layer {node.name} ({what}); it emits {EMITS}")


def build_plan(model: nn.Module, stored: Sequence[StoredLayer],
               space: SearchSpace | PlanInput, preprocess: Preprocess | None,
               calib_x: torch.Tensor) -> dict[str, Any]:
    """The integer plan of the deployed ``model`` (its ``stored`` layers' integers), activation
    ranges calibrated on ``calib_x`` (training samples as the network takes them:
    preprocessed). Of ``space`` only the name, input shape and class count are read: a fixed
    model passes a :class:`PlanInput` (its stored layers from
    :func:`nasopt.compression.compress.compress`)."""
    from nasopt.deploy.onnx import plain
    preprocess = preprocess or Preprocess()
    try:
        gm = fx.symbolic_trace(plain(model))
    except Exception as exc:
        raise NasoptError(f"the C export cannot trace the model ({type(exc).__name__}: "
                          f"{str(exc)[:160]}); the network must be fx-traceable") from None
    ShapeProp(gm).propagate(torch.zeros((1, *space.input_shape)))
    recorder = _Recorder(gm)
    with torch.no_grad():
        for i in range(0, len(calib_x), 256):
            recorder.run(calib_x[i:i + 256].float().cpu())
    ranges = recorder.ranges
    layers = {s.name: s for s in stored}
    nodes = list(gm.graph.nodes)

    tensors: list[dict[str, Any]] = []  # shape, the node whose range defines it
    value: dict[fx.Node, int] = {}
    ops: list[dict[str, Any]] = []
    absorbed: set[fx.Node] = set()

    def shape_of(node: fx.Node) -> list[int]:
        return [int(d) for d in node.meta["tensor_meta"].shape[1:]]

    def new_tensor(node: fx.Node) -> int:
        tensors.append({"shape": shape_of(node), "node": node.name})
        return len(tensors) - 1

    def follow(node: fx.Node) -> tuple[fx.Node, str | None]:
        """The last node of ``node``'s alias chain and a fused ReLU/ReLU6 after it."""
        act = None
        while len(node.users) == 1:
            user = next(iter(node.users))
            kind = _alias_or_act(gm, user)
            if kind == "alias" and act is None:
                absorbed.add(user)
                node = user
            elif kind in ("relu", "relu6") and act is None:
                absorbed.add(user)
                node, act = user, kind
            else:
                break
        return node, act

    for node in nodes:
        if node in absorbed:
            continue
        if node.op == "placeholder":
            value[node] = new_tensor(node)
            continue
        if node.op == "output":
            break
        if node.op == "get_attr":
            raise _unsupported(node, "a parameter read outside a layer")
        kind = _alias_or_act(gm, node)
        if kind == "alias":
            value[node] = value[node.all_input_nodes[0]]
            continue
        if kind in ("relu", "relu6"):
            raise _unsupported(node, f"a {kind} that does not follow a layer it can fuse into")
        if node.op == "call_module":
            module = gm.get_submodule(str(node.target))
            if not isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Linear)):
                raise _unsupported(node, type(module).__name__)
            if str(node.target) not in layers:
                raise _unsupported(node, f"{type(module).__name__} without stored weights")
            src = value[node.all_input_nodes[0]]
            end, act = follow(node)
            out = new_tensor(end)
            value[end] = out
            ops.append(_layer_op(module, layers[str(node.target)], src, out, act,
                                 shape_of(node.all_input_nodes[0]), shape_of(node), node))
            continue
        if node.op == "call_function" and node.target in _ADD:
            args = [a for a in node.args if isinstance(a, fx.Node)]
            if len(args) != 2 or node.kwargs or len(node.args) != 2 \
                    or shape_of(args[0]) != shape_of(args[1]):
                raise _unsupported(node, "an add that is not of two tensors of one shape")
            end, act = follow(node)
            out = new_tensor(end)
            value[end] = out
            ops.append({"op": "add", "a": value[args[0]], "b": value[args[1]], "out": out,
                        "act": act, "name": node.name})
            continue
        pool = _max_pool(gm, node)
        if pool is not None:
            src = node.all_input_nodes[0]
            c, h, w = shape_of(src)
            if len(shape_of(node)) != 3:
                raise _unsupported(node, "a max pooling that is not 2-D")
            end, act = follow(node)
            out = new_tensor(end)
            # the maximum commutes with the input's quantization: the output keeps its scale
            # and zero point (no requantization)
            tensors[out]["node"] = tensors[value[src]]["node"]
            value[end] = out
            _, oh, ow = shape_of(node)
            ops.append({"op": "maxpool", "in": value[src], "out": out, "act": act,
                        "name": node.name, "channels": c, "in_h": h, "in_w": w, "out_h": oh,
                        "out_w": ow, **pool})
            continue
        if _is_spatial_mean(node):
            src = node.args[0]
            end, act = follow(node)
            if act is not None:
                raise _unsupported(end, "an activation after mean pooling")
            out = new_tensor(end)
            value[end] = out
            ops.append({"op": "mean", "in": value[src], "out": out, "name": node.name,
                        "channels": shape_of(src)[0],
                        "spatial": math.prod(shape_of(src)[1:])})
            continue
        raise _unsupported(node, f"{node.op} {getattr(node.target, '__name__', node.target)}")

    output = nodes[-1].args[0]
    if not isinstance(output, fx.Node) or output not in value:
        raise NasoptError("the C export needs a network with one output tensor")
    last = value[output]
    if not ops or ops[-1]["out"] != last or ops[-1]["op"] != "conv" or ops[-1]["act"]:
        raise NasoptError("the C export needs a network whose last op is a linear layer (or "
                          "conv) without activation: its accumulators are the logits")
    return _finish(ops, tensors, ranges, space, preprocess, last)


def _alias_or_act(gm: fx.GraphModule, node: fx.Node) -> str | None:
    if node.op == "call_module":
        module = gm.get_submodule(str(node.target))
        if isinstance(module, _ALIAS_MODULES):
            return "alias"
        return _RELU_MODULES.get(type(module))
    if node.op == "call_function":
        if node.target in _ALIAS_FUNCTIONS:
            return "alias"
        return _RELU.get(node.target)
    if node.op == "call_method":
        if node.target in _ALIAS_METHODS:
            return "alias"
        if node.target in ("relu", "relu_"):
            return "relu"
    return None


def _max_pool(gm: fx.GraphModule, node: fx.Node) -> dict[str, int] | None:
    """``{k, stride, pad}`` of a 2-D max pooling node (``F.max_pool2d`` or ``nn.MaxPool2d``);
    None for another node. A window that is not square, dilation or returned indices is an
    error that names the layer."""
    if node.op == "call_module" and isinstance(gm.get_submodule(str(node.target)), nn.MaxPool2d):
        m = gm.get_submodule(str(node.target))
        k, stride, pad, dil, indices = (m.kernel_size, m.stride, m.padding, m.dilation,
                                        m.return_indices)
    elif node.op == "call_function" and node.target is F.max_pool2d:
        names = ("input", "kernel_size", "stride", "padding", "dilation", "ceil_mode",
                 "return_indices")
        args = {**dict(zip(names, node.args)), **node.kwargs}
        k = args["kernel_size"]
        stride, pad = args.get("stride") or k, args.get("padding", 0)
        dil, indices = args.get("dilation", 1), args.get("return_indices", False)
    else:
        return None
    pair = lambda v: tuple(v) if isinstance(v, (tuple, list)) else (v, v)  # noqa: E731
    k, stride, pad, dil = pair(k), pair(stride), pair(pad), pair(dil)
    if k[0] != k[1] or stride[0] != stride[1] or pad[0] != pad[1] or dil != (1, 1) or indices:
        raise _unsupported(node, "a max pooling with an unequal window, stride or padding, "
                                 "dilation or indices")
    return {"k": int(k[0]), "stride": int(stride[0]), "pad": int(pad[0])}


def _max_pool_int(op: Mapping[str, Any], x: np.ndarray) -> np.ndarray:
    """The maxpool op on int8 values ``x`` (N, numel): the largest of each window's positions
    inside the map (padding never wins), clamped by its fused activation."""
    n = len(x)
    src = x.reshape(n, op["channels"], op["in_h"], op["in_w"])
    out = np.empty((n, op["channels"], op["out_h"], op["out_w"]), np.int64)
    k, s, p = op["k"], op["stride"], op["pad"]
    for oy in range(op["out_h"]):
        y0, y1 = max(oy * s - p, 0), min(oy * s - p + k, op["in_h"])
        for ox in range(op["out_w"]):
            x0, x1 = max(ox * s - p, 0), min(ox * s - p + k, op["in_w"])
            out[:, :, oy, ox] = src[:, :, y0:y1, x0:x1].max(axis=(2, 3))
    return np.clip(out, op["act_min"], op["act_max"]).reshape(n, -1)


def _is_spatial_mean(node: fx.Node) -> bool:
    if not ((node.op == "call_method" and node.target == "mean")
            or (node.op == "call_function" and node.target is torch.mean)):
        return False
    dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    rank = len(node.args[0].meta["tensor_meta"].shape)
    if dims is None:
        return False
    dims = [dims] if isinstance(dims, int) else list(dims)
    return sorted(d % rank for d in dims) == list(range(2, rank)) and rank >= 3 \
        and not node.kwargs.get("keepdim", False)


def _layer_op(module: nn.Module, layer: StoredLayer, src: int, out: int, act: str | None,
              in_shape: list[int], out_shape: list[int], node: fx.Node) -> dict[str, Any]:
    q, scale, bits, mask = _integer_weights(layer)
    op: dict[str, Any] = {"op": "conv", "name": node.name, "layer": layer.name, "in": src,
                          "out": out, "act": act, "bits": bits, "w_scale": scale.tolist(),
                          "bias": None if layer.bias is None else layer.bias.numpy().tolist()}
    if isinstance(module, nn.Linear):
        cout, cin = q.shape
        op.update(kind="1d", cin=cin, cout=cout, k=1, stride=1, pad=0, in_len=1, out_len=1)
    else:
        stride, pad = module.stride[0], module.padding
        if isinstance(pad, str) or any(p != pad[0] for p in pad) \
                or any(s != stride for s in module.stride) or any(d != 1 for d in module.dilation) \
                or module.padding_mode != "zeros":
            raise _unsupported(node, "a conv with unequal, string or non-zero padding, "
                                     "unequal strides or dilation")
        pad = pad[0]
        cout, cin_g, k = q.shape[0], q.shape[1], q.shape[2]
        if any(s != k for s in q.shape[2:]):
            raise _unsupported(node, "a conv with a non-square kernel")
        cin = in_shape[0]
        if module.groups == 1:
            pass
        elif module.groups == cin == cout and cin_g == 1:
            if isinstance(module, nn.Conv1d):
                raise _unsupported(node, "a depthwise Conv1d")
        else:
            raise _unsupported(node, f"a grouped conv (groups={module.groups})")
        depthwise = module.groups > 1
        if isinstance(module, nn.Conv1d):
            op.update(kind="1d", cin=cin, cout=cout, k=k, stride=stride, pad=pad,
                      in_len=in_shape[1], out_len=out_shape[1])
        elif not depthwise and k == 1 and stride == 1 and pad == 0:  # pointwise: a 1-D conv
            op.update(kind="1d", cin=cin, cout=cout, k=1, stride=1, pad=0,
                      in_len=in_shape[1] * in_shape[2], out_len=out_shape[1] * out_shape[2])
        else:
            op.update(kind="dw" if depthwise else "2d", cin=cin, cout=cout, k=k, stride=stride,
                      pad=pad, in_h=in_shape[1], in_w=in_shape[2], out_h=out_shape[1],
                      out_w=out_shape[2])
    op["q"] = q.reshape(cout, -1).tolist()
    op["mask"] = None if mask is None else mask.reshape(cout, -1).astype(int).tolist()
    return op


def _finish(ops: list[dict[str, Any]], tensors: list[dict[str, Any]],
            ranges: Mapping[str, list[float]], space: SearchSpace | PlanInput,
            preprocess: Preprocess,
            last: int) -> dict[str, Any]:
    for i, t in enumerate(tensors):
        lo, hi = ranges[t["node"]]
        t["scale"], t["zp"] = quant_params(lo, hi)
        t["bytes"] = math.prod(t["shape"])
    s_in, zp_in = tensors[0]["scale"], tensors[0]["zp"]
    a = np.float32(1.0 / (preprocess.std * s_in))
    c = np.float32(-preprocess.mean / (preprocess.std * s_in) + zp_in + 256.5)
    lo, hi = ranges[tensors[last]["node"]]
    logit_scale = max(abs(lo), abs(hi), 1e-6) / LOGIT_STEPS
    for op in ops:
        out = tensors[op["out"]]
        lo_q, hi_q = -128, 127
        if op.get("act"):
            lo_q = out["zp"]
            if op["act"] == "relu6":
                hi_q = int(min(127, out["zp"] + round(6.0 / out["scale"])))
        op["act_min"], op["act_max"] = lo_q, hi_q
        if op["op"] == "conv":
            s_x = tensors[op["in"]]["scale"]
            s_w = np.asarray(op.pop("w_scale"))
            s_out = logit_scale if op["out"] == last else out["scale"]
            pairs = [multiplier(s_x * sw / s_out) for sw in s_w]
            op["mult"], op["shift"] = [p[0] for p in pairs], [p[1] for p in pairs]
            bias = np.zeros(op["cout"]) if op["bias"] is None else np.asarray(op["bias"])
            # the int32 accumulator never overflows: |x - zp| <= 255, |w| <= 127 per product
            room = 2 ** 31 - 1 - 255 * 127 * len(op["q"][0])
            if room <= 0:
                raise NasoptError(f"the C export cannot emit layer {op['name']}: "
                                  f"{len(op['q'][0])} products per output may overflow int32")
            op["bias"] = np.clip(np.round(bias / (s_x * s_w)), -room, room
                                 ).astype(np.int64).tolist()
            op["logits"] = op["out"] == last
        elif op["op"] == "add":
            ra = tensors[op["a"]]["scale"] / out["scale"]
            rb = tensors[op["b"]]["scale"] / out["scale"]
            s = min(30, ADD_BITS - 1 - math.floor(math.log2(max(ra, rb))))
            if s < 1:
                raise NasoptError("a residual add's input scales are too far apart for int32 "
                                  "fixed point")
            op["mult_a"], op["mult_b"], op["shift"] = round(ra * 2 ** s), round(rb * 2 ** s), s
        elif op["op"] == "mean":
            m, r = multiplier(tensors[op["in"]]["scale"] / (op["spatial"] * out["scale"]))
            op["mult"], op["shift"] = m, r
    return {"version": PLAN_VERSION, "space": space.name,
            "input_shape": list(space.input_shape), "num_classes": int(space.num_classes),
            "input": {"a": float(a), "c": float(c), "scale": s_in, "zp": zp_in,
                      "preprocess": preprocess.to_dict()},
            "logit_scale": logit_scale, "tensors": tensors, "ops": ops, "output": last}


# ---- running the plan -------------------------------------------------------------------------
def quantize_input(plan: Mapping[str, Any], x: np.ndarray) -> np.ndarray:
    """Raw samples (N, ...) -> int8 inputs (N, numel) as int64, the C code's float32 steps."""
    x = np.asarray(x, np.float32).reshape(len(x), -1)
    u = x * np.float32(plan["input"]["a"])
    u = u + np.float32(plan["input"]["c"])
    u = np.where(u > 0, u, np.float32(0))  # NaN -> 0
    u = np.minimum(u, np.float32(511))
    return np.clip(u.astype(np.int64) - 256, -128, 127)


def _conv(op: Mapping[str, Any], x: np.ndarray, zp_in: int, zp_out: int) -> np.ndarray:
    """The conv op on int8 inputs ``x`` (N, numel). The sums of integer products are exact in
    float64 (every partial sum stays far below 2^53), so torch's float64 convolution computes
    the int32 accumulators exactly, in any order."""
    n = len(x)
    w = torch.tensor(op["q"], dtype=torch.float64)
    xs = torch.from_numpy((x - zp_in).astype(np.float64))  # zero padding: x - zp_in = 0
    k, stride, pad = op["k"], op["stride"], op["pad"]
    with torch.no_grad():
        if op["kind"] == "1d":
            acc = F.conv1d(xs.reshape(n, op["cin"], op["in_len"]),
                           w.reshape(op["cout"], op["cin"], k), stride=stride, padding=pad)
        else:
            groups = op["cin"] if op["kind"] == "dw" else 1
            acc = F.conv2d(xs.reshape(n, op["cin"], op["in_h"], op["in_w"]),
                           w.reshape(op["cout"], op["cin"] // groups, k, k), stride=stride,
                           padding=pad, groups=groups)
    acc = np.rint(acc.numpy()).astype(np.int64).reshape(n, op["cout"], -1)
    acc = acc + np.asarray(op["bias"], np.int64)[None, :, None]
    y = requantize(acc, op["mult"], op["shift"])
    if op["logits"]:
        return np.clip(y, -2 ** 31, 2 ** 31 - 1).reshape(n, -1)
    return np.clip(y + zp_out, op["act_min"], op["act_max"]).reshape(n, -1)


def run(plan: Mapping[str, Any], x: np.ndarray, batch: int = 500) -> np.ndarray:
    """int32 logits (N, classes) of raw samples ``x`` (N, *input_shape), as int64."""
    out = [_run(plan, np.asarray(x[i:i + batch])) for i in range(0, len(x), batch)]
    return np.concatenate(out) if out else np.zeros((0, plan["num_classes"]), np.int64)


def _run(plan: Mapping[str, Any], x: np.ndarray) -> np.ndarray:
    tensors = plan["tensors"]
    vals: dict[int, np.ndarray] = {0: quantize_input(plan, x)}
    for op in plan["ops"]:
        out = tensors[op["out"]]
        if op["op"] == "conv":
            vals[op["out"]] = _conv(op, vals[op["in"]], tensors[op["in"]]["zp"], out["zp"])
        elif op["op"] == "add":
            ta, tb = tensors[op["a"]], tensors[op["b"]]
            s = op["shift"]
            acc = ((vals[op["a"]] - ta["zp"]) * op["mult_a"] + (vals[op["b"]] - tb["zp"])
                   * op["mult_b"] + (1 << (s - 1))) >> s
            vals[op["out"]] = np.clip(acc + out["zp"], op["act_min"], op["act_max"])
        elif op["op"] == "maxpool":
            vals[op["out"]] = _max_pool_int(op, vals[op["in"]])
        else:  # mean
            n = len(x)
            src = vals[op["in"]].reshape(n, op["channels"], op["spatial"])
            acc = (src - tensors[op["in"]]["zp"]).sum(axis=2)
            y = requantize(acc, np.full(op["channels"], op["mult"]),
                           np.full(op["channels"], op["shift"]))
            vals[op["out"]] = np.clip(y + out["zp"], op["act_min"], op["act_max"])
    return vals[plan["output"]]


def predict(plan: Mapping[str, Any], x: np.ndarray) -> np.ndarray:
    """Classes (the first index of the largest logit)."""
    return np.argmax(run(plan, x), axis=1)


def float_logits(plan: Mapping[str, Any], logits: np.ndarray) -> np.ndarray:
    return logits.astype(np.float64) * plan["logit_scale"]


def save(plan: Mapping[str, Any], path: str | Path) -> None:
    Path(path).write_text(json.dumps(plan, separators=(",", ":")) + "\n")


def load(path: str | Path) -> dict[str, Any]:
    try:
        plan = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise NasoptError(f"cannot read the integer plan {path} ({exc}); export the model "
                          f"again with `nasopt export ... --format c`") from None
    if not isinstance(plan, dict) or plan.get("version") != PLAN_VERSION:
        raise NasoptError(f"{path} is not an integer plan of this nasopt version; export the "
                          f"model again with `nasopt export ... --format c`")
    return plan


def plan_of_export(folder: str | Path, spaces: Mapping[str, type[SearchSpace]],
                   calib_x: torch.Tensor) -> dict[str, Any]:
    """The plan of an export folder's ``model.packed``, calibrated on ``calib_x`` (training
    samples, preprocessed as the network takes them)."""
    from nasopt.deploy.export import preprocess_of_card, read_card
    folder = Path(folder)
    card = read_card(folder)
    if not (folder / "model.packed").exists():
        raise NasoptError(f"{folder} holds no model.packed; the C export reads the packed "
                          f"model (export with --format packed too)")
    space, _, model, stored = read_packed(folder / "model.packed", spaces)
    return build_plan(model, stored, space, preprocess_of_card(card), calib_x)
