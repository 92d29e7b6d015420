"""The packed file: a compressed model in the fewest bytes we can account for exactly.

Layout (little endian)::

    header   b"NSOP", u8 version (3), u8 len + space name, u8 ndim + u16 per input dim,
             u16 classes, u8 compression flag, u8 gene count + u8 option index per gene
             (the arch, as indices into the space's full option lists)
    layers   for every weight layer of the deployed structure, in module order:
               if the arch prunes (sparsity > 0):
                   u32 nnz, u8 encoding (0 bitmask, 1 index list),
                   bitmask ceil(n/8) bytes | nnz indices of u16 (n <= 65536) or u32,
                   whichever is smaller (ties: bitmask)
               if bits < 32, uniform: f32 scale per output row, then the kept values as
                   b-bit two's-complement integers, bit-packed, ceil(count * b / 8) bytes
               if bits < 32, codebook: f32 scale per output row, the 2^b f32 shared levels,
                   then each kept value's level index as a b-bit unsigned integer,
                   bit-packed, ceil(count * b / 8) bytes
               else: the kept values as f32
               f32 bias per output channel, if the layer has a bias
    checksum u32 CRC-32 of every byte before it (zlib's): a flipped bit or a cut file is
             refused on load instead of giving wrong outputs

Everything structural (shapes, bits, codebook or uniform, which layers are factorized or have a
bias) follows from the arch, so it is not stored. :func:`predicted_size` counts these bytes from a
formula; :func:`pack` writes them; a test checks that the two agree. Files of version 1 (the same
layout without the checksum) and 2 (without codebook records) still load; a file written before
a space gained genes (its header lists fewer) reads them as :meth:`SearchSpace.gene_defaults
<nasopt.core.space.SearchSpace.gene_defaults>` says (full rank, uniform quantization).
"""
from __future__ import annotations

import math
import struct
import zlib
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from torch import nn

from nasopt.core.arch import Arch, Value
from nasopt.compression.compress import (
    FLOAT_BITS, Policy, StoredLayer, StoredTensor, compressed_structure, weight_layers,
)
from nasopt.core.errors import NasoptError
from nasopt.core.space import SearchSpace

MAGIC = b"NSOP"
VERSION = 3
#: versions :func:`unpack` reads (1: no checksum; 2: no codebook records)
READABLE = (1, 2, 3)
#: the last version that changed the bytes of a record an earlier version could write: what a
#: study's size objective counts (version 3 only added codebook records, so a study sized in
#: version 2 goes on in version 3)
SIZE_FORMAT = 2
#: the CRC-32 at the end of a version-2 file
CHECKSUM_BYTES = 4


# ---- header ------------------------------------------------------------------------------
def header(space: SearchSpace, arch: Mapping[str, Value]) -> bytes:
    full = space.full_genes()
    name = space.name.encode()
    out = [MAGIC, struct.pack("<BB", VERSION, len(name)), name,
           struct.pack("<B", len(space.input_shape)),
           struct.pack(f"<{len(space.input_shape)}H", *space.input_shape),
           struct.pack("<HBB", space.num_classes, int(space.compression), len(full))]
    out.append(bytes(full[g].index(arch[g]) for g in full))
    return b"".join(out)


def _read_header(data: bytes, spaces: Mapping[str, type[SearchSpace]]) -> tuple[SearchSpace, Arch, int]:
    if data[:4] != MAGIC:
        raise NasoptError("not a nasopt packed file (bad magic); export one with "
                          "`nasopt export STUDY --trial N --format packed`")
    version, n = struct.unpack_from("<BB", data, 4)
    if version not in READABLE:
        raise NasoptError(f"packed file version {version} is not supported (this nasopt reads "
                          f"versions {', '.join(map(str, READABLE))}); export it again")
    pos = 6
    name = data[pos:pos + n].decode()
    pos += n
    (ndim,) = struct.unpack_from("<B", data, pos)
    shape = struct.unpack_from(f"<{ndim}H", data, pos + 1)
    pos += 1 + 2 * ndim
    classes, compression, n_genes = struct.unpack_from("<HBB", data, pos)
    pos += 4
    if name not in spaces:
        raise NasoptError(f"packed file is for unknown space {name!r}; known: {', '.join(spaces)}")
    space = spaces[name](shape, classes, None, bool(compression)).full_space()
    # genes a space gained after the file was written come last, at their absent value
    later = list(space.genes)[n_genes:]
    defaults = space.gene_defaults()
    if n_genes > len(space.genes) or any(g not in defaults for g in later):
        raise NasoptError(f"packed file has {n_genes} genes but space {name!r} has "
                          f"{len(space.genes)}; it was written by another nasopt version")
    index = data[pos:pos + n_genes]
    if len(index) != n_genes or any(i >= len(opts) for i, opts in zip(index, space.genes.values())):
        raise NasoptError("packed file is corrupt (bad arch in header); export it again")
    arch = Arch({**{g: opts[i] for (g, opts), i in zip(space.genes.items(), index)},
                 **{g: defaults[g] for g in later}})
    return space, arch, pos + n_genes


# ---- sizes ---------------------------------------------------------------------------------
def _index_bytes(n: int) -> int:
    return 2 if n <= 65536 else 4


def _mask_bytes(n: int, nnz: int) -> tuple[int, int]:
    """(encoding, bytes): bitmask or index list, whichever is smaller."""
    bitmask, index = math.ceil(n / 8), nnz * _index_bytes(n)
    return (0, bitmask) if bitmask <= index else (1, index)


def layer_size(layer: StoredLayer) -> int:
    w = layer.weight
    n = math.prod(w.shape)
    size, count = 0, n
    if w.masked:
        count = int(w.mask.sum())
        size += 4 + 1 + _mask_bytes(n, count)[1]
    if w.bits < FLOAT_BITS:
        levels = 4 * 2 ** w.bits if w.codebook is not None else 0
        size += 4 * w.shape[0] + levels + math.ceil(count * w.bits / 8)
    else:
        size += 4 * count
    if layer.bias is not None:
        size += 4 * layer.bias.numel()
    return size


def fixed_size(space: SearchSpace, arch: Mapping[str, Value]) -> int:
    """Bytes of the packed file that do not depend on the weights: header and checksum."""
    return len(header(space, arch)) + CHECKSUM_BYTES


def predicted_size(space: SearchSpace, arch: Mapping[str, Value], stored: list[StoredLayer]) -> int:
    """Bytes of the packed file for ``arch`` with these stored layers, from the formula."""
    return fixed_size(space, arch) + sum(layer_size(layer) for layer in stored)


# ---- writing -------------------------------------------------------------------------------
def _pack_ints(values: np.ndarray, bits: int) -> bytes:
    unsigned = values.astype(np.int64) & ((1 << bits) - 1)
    bitplanes = ((unsigned[:, None] >> np.arange(bits)) & 1).astype(np.uint8)
    return np.packbits(bitplanes.reshape(-1), bitorder="little").tobytes()


def _unpack_ints(data: bytes, count: int, bits: int, signed: bool = True) -> np.ndarray:
    planes = np.unpackbits(np.frombuffer(data, np.uint8), bitorder="little")[:count * bits]
    values = (planes.reshape(count, bits).astype(np.int64) << np.arange(bits)).sum(axis=1)
    if not signed:
        return values
    return np.where(values >= 1 << (bits - 1), values - (1 << bits), values)


def pack(space: SearchSpace, arch: Mapping[str, Value], stored: list[StoredLayer]) -> bytes:
    out = [header(space, arch)]
    for layer in stored:
        w = layer.weight
        flat_q = (w.q if w.q is not None else w.values).reshape(-1)
        if w.masked:
            mask = w.mask.reshape(-1).numpy()
            nnz = int(mask.sum())
            encoding, _ = _mask_bytes(mask.size, nnz)
            out.append(struct.pack("<IB", nnz, encoding))
            if encoding == 0:
                out.append(np.packbits(mask.astype(np.uint8), bitorder="little").tobytes())
            else:
                dtype = "<u2" if _index_bytes(mask.size) == 2 else "<u4"
                out.append(np.flatnonzero(mask).astype(dtype).tobytes())
            flat_q = flat_q[torch.from_numpy(mask)]
        if w.bits < FLOAT_BITS:
            out.append(w.scale.numpy().astype("<f4").tobytes())
            if w.codebook is not None:
                out.append(w.codebook.numpy().astype("<f4").tobytes())
            out.append(_pack_ints(flat_q.numpy(), w.bits))
        else:
            out.append(flat_q.numpy().astype("<f4").tobytes())
        if layer.bias is not None:
            out.append(layer.bias.numpy().astype("<f4").tobytes())
    body = b"".join(out)
    return body + struct.pack("<I", zlib.crc32(body))


# ---- reading -------------------------------------------------------------------------------
def unpack(data: bytes, spaces: Mapping[str, type[SearchSpace]]) -> tuple[nn.Module, Arch]:
    """Rebuild the deployed model (eval mode) and its arch from packed bytes."""
    _, arch, model, _ = unpack_stored(data, spaces)
    return model, arch


def unpack_stored(data: bytes, spaces: Mapping[str, type[SearchSpace]]
                  ) -> tuple[SearchSpace, Arch, nn.Module, list[StoredLayer]]:
    """(space, arch, deployed model in eval mode, stored layers) of packed bytes: the integers,
    scales and codebooks exactly as stored (the model holds them decoded)."""
    try:
        return _unpack(data, spaces)
    except (struct.error, IndexError, ValueError) as exc:
        raise NasoptError(f"packed file is corrupt ({exc}); export it again") from None


def _unpack(data: bytes, spaces: Mapping[str, type[SearchSpace]]
            ) -> tuple[SearchSpace, Arch, nn.Module, list[StoredLayer]]:
    if data[:4] == MAGIC and len(data) > 4 + CHECKSUM_BYTES and data[4] >= 2:
        # the checksum before anything else is read: nothing of a damaged file is used
        body, (crc,) = data[:-CHECKSUM_BYTES], struct.unpack("<I", data[-CHECKSUM_BYTES:])
        if zlib.crc32(body) != crc:
            raise NasoptError("packed file is damaged (its checksum does not match: a changed "
                              "or cut file); export it again")
    space, arch, pos = _read_header(data, spaces)
    if data[4] >= 2:
        data = data[:-CHECKSUM_BYTES]
    policy = Policy.from_arch(arch)
    model = compressed_structure(space.build(arch), policy, space.group_of)

    def take(n: int) -> bytes:
        nonlocal pos
        if pos + n > len(data):
            raise NasoptError("packed file is truncated; export it again")
        chunk = data[pos:pos + n]
        pos += n
        return chunk

    stored: list[StoredLayer] = []
    with torch.no_grad():
        for name, module in weight_layers(model):
            group = space.group_of(name)
            bits = policy.bits_of(group)
            shape = module.weight.shape
            n = math.prod(shape)
            mask = None
            count = n
            if policy.sparsity > 0:
                count, encoding = struct.unpack("<IB", take(5))
                if encoding not in (0, 1) or count > n:
                    raise NasoptError("packed file is corrupt (bad sparsity record); export it "
                                      "again")
                if encoding == 0:
                    bitmask = np.unpackbits(np.frombuffer(take(math.ceil(n / 8)), np.uint8),
                                            bitorder="little")[:n]
                    mask = bitmask.astype(bool)
                else:
                    dtype = np.dtype("<u2" if _index_bytes(n) == 2 else "<u4")
                    idx = np.frombuffer(take(count * dtype.itemsize), dtype)
                    mask = np.zeros(n, bool)
                    mask[idx] = True
                if int(mask.sum()) != count:
                    raise NasoptError("packed file is corrupt (mask and count disagree); "
                                      "export it again")
            kept = torch.from_numpy(mask).reshape(shape) if mask is not None else None
            if bits < FLOAT_BITS:
                codebook = policy.codebook_of(group)
                scale = torch.from_numpy(np.frombuffer(take(4 * shape[0]), "<f4").copy())
                levels = (torch.from_numpy(np.frombuffer(take(4 * 2 ** bits), "<f4").copy())
                          if codebook else None)
                ints = _unpack_ints(take(math.ceil(count * bits / 8)), count, bits,
                                    signed=not codebook)
                values = np.zeros(n, np.int64)
                values[mask if mask is not None else slice(None)] = ints
                q = torch.from_numpy(values).reshape(shape)
                tensor = (StoredTensor(bits, tuple(shape), kept is not None, q, scale, None,
                                       kept, codebook=levels) if codebook else
                          StoredTensor(bits, tuple(shape), kept is not None, q.to(torch.int32),
                                       scale, None, kept))
            else:
                floats = np.frombuffer(take(4 * count), "<f4")
                values = np.zeros(n, np.float32)
                values[mask if mask is not None else slice(None)] = floats
                tensor = StoredTensor(bits, tuple(shape), kept is not None, None, None,
                                      torch.from_numpy(values).reshape(shape), kept)
            module.weight.copy_(tensor.dense())
            bias = None
            if module.bias is not None:
                bias = torch.from_numpy(np.frombuffer(take(4 * module.bias.numel()), "<f4").copy())
                module.bias.copy_(bias)
            stored.append(StoredLayer(name, tensor, bias))
    if pos != len(data):
        raise NasoptError(f"packed file has {len(data) - pos} unexpected trailing bytes; "
                          f"export it again")
    return space, arch, model.eval(), stored


def write(path: Path, data: bytes) -> None:
    from nasopt.core.checkpoint import atomic_write_bytes
    atomic_write_bytes(Path(path), data)


def read(path: Path, spaces: Mapping[str, type[SearchSpace]]) -> tuple[nn.Module, Arch]:
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise NasoptError(f"cannot read packed file {path} ({exc.strerror})") from None
    return unpack(data, spaces)
