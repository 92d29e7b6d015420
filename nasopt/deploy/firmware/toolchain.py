"""Build and run a C export: on the host (gcc) and on an emulated Cortex-M4 (QEMU mps2-an386).

- :func:`host_logits`: ``model.c`` with a small reader (``harness/host_main.c``) built by the
  host's C compiler (``-std=c99 -O2 -ffp-contract=off``); returns the int32 logits of samples.
- :func:`m4_run`: ``model.c`` built for the Cortex-M4 (``-mcpu=cortex-m4 -mthumb``, hard float,
  ``-Os``), linked with a vector table and reset handler of its own (``harness/m4_startup.c``),
  a linker script (code at 0x0, RAM at 0x20000000) and newlib's semihosting (``rdimon``); run in
  ``qemu-system-arm -M mps2-an386 -icount shift=0`` (one instruction per virtual nanosecond). It
  returns the classes printed and measures, from the linked image and the run:

  - ``flash_bytes``: the model's code, constants and initialized data in flash (the input
    sections of ``model.o`` in the link map, plus the library routines ``model.o`` calls);
  - ``ram_bytes``: its ``.data`` + ``.bss`` (the arena) + the stack high-water mark of
    ``nasopt_predict`` (the stack is painted below the caller's stack pointer);
  - ``instructions``: per inference, the SysTick ticks spent inside ``nasopt_predict`` times the
    instructions per tick of a loop of known instruction count: an instruction count of the
    emulator, a relative cost, not a board's latency.
"""
from __future__ import annotations

import contextlib
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from nasopt.core.errors import NasoptError

APT = "apt-get install -y gcc-arm-none-eabi libnewlib-arm-none-eabi qemu-system-arm"
M4_FLAGS = ["-mcpu=cortex-m4", "-mthumb", "-mfloat-abi=hard", "-mfpu=fpv4-sp-d16", "-Os",
            "-std=c99", "-ffp-contract=off", "-ffunction-sections", "-fdata-sections", "-Wall",
            "-Wextra"]
HOST_FLAGS = ["-std=c99", "-O2", "-ffp-contract=off", "-Wall", "-Wextra", "-pedantic"]
QEMU = ["qemu-system-arm", "-M", "mps2-an386", "-nographic", "-monitor", "none",
        "-semihosting-config", "enable=on,target=native", "-icount", "shift=0"]


class ToolchainMissing(NasoptError):
    """A compiler or the emulator is not installed."""


def _harness(name: str) -> str:
    return resources.files("nasopt.deploy.firmware").joinpath("harness", name).read_text()


def _need(*tools: str, hint: str) -> None:
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        raise ToolchainMissing(f"{', '.join(missing)} not found: {hint}")


def arm_available() -> bool:
    return all(shutil.which(t) for t in ("arm-none-eabi-gcc", "qemu-system-arm"))


def host_compiler() -> str:
    for cc in ("gcc", "cc", "clang"):
        if shutil.which(cc):
            return cc
    raise ToolchainMissing("no C compiler (gcc, cc or clang) found: install one "
                           "(apt-get install -y gcc) to verify the C export on the host")


def write_samples(path: Path, x: np.ndarray) -> None:
    x = np.ascontiguousarray(np.asarray(x, "<f4").reshape(len(x), -1))
    path.write_bytes(np.asarray([len(x), x.shape[1]], "<i4").tobytes() + x.tobytes())


def _run(cmd: list[str], cwd: Path, what: str, timeout: float = 600) -> str:
    try:
        done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise NasoptError(f"{what} did not finish in {timeout:.0f} s") from None
    if done.returncode != 0:
        raise NasoptError(f"{what} failed (exit {done.returncode}): "
                          f"{(done.stderr or done.stdout).strip()[-600:]}")
    return done.stdout


def host_logits(folder: str | Path, x: np.ndarray, num_classes: int) -> np.ndarray:
    """int32 logits of the raw samples ``x`` from ``folder``'s model.c built on the host."""
    cc = host_compiler()
    folder = Path(folder)
    with tempfile.TemporaryDirectory(prefix="nasopt-c-") as tmp_name:
        tmp = Path(tmp_name)
        for name in ("model.h", "model.c"):
            shutil.copy2(folder / name, tmp / name)
        (tmp / "host_main.c").write_text(_harness("host_main.c"))
        _run([cc, *HOST_FLAGS, "-Werror", "model.c", "host_main.c", "-o", "host"], tmp,
             "building the C export on the host")
        write_samples(tmp / "samples.bin", x)
        _run(["./host", "samples.bin", "logits.bin"], tmp, "running the C export on the host")
        return np.fromfile(tmp / "logits.bin", "<i4").astype(np.int64).reshape(-1, num_classes)


@dataclass
class M4Result:
    classes: np.ndarray
    flash_bytes: int
    flash_code_bytes: int
    flash_const_bytes: int
    ram_bytes: int
    ram_static_bytes: int
    stack_bytes: int
    instructions: float  # per inference
    image_text_bytes: int  # the whole image (harness and newlib included), for reference
    samples: int

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("classes")
        return d


def m4_run(folder: str | Path, x: np.ndarray, timeout: float = 600) -> M4Result:
    """Build ``folder``'s model.c for the Cortex-M4, run the raw samples ``x`` in QEMU."""
    _need("arm-none-eabi-gcc", "arm-none-eabi-size", "qemu-system-arm",
          hint=f"install the Cortex-M4 toolchain and emulator: {APT}")
    with _m4_image(folder) as tmp:
        write_samples(tmp / "samples.bin", x)
        out = _run([*QEMU, "-kernel", "image.elf"], tmp, "the Cortex-M4 run in QEMU", timeout)
        sizes = _model_sizes(tmp)
        total_text = int(_run(["arm-none-eabi-size", "-A", "image.elf"], tmp, "size")
                         .split(".text")[1].split()[0])
    lines = out.splitlines()
    classes = np.array([int(s) for s in lines if s and not s.startswith("#")], np.int64)
    info = {s.split()[0][1:]: [int(v) for v in s.split()[1:]] for s in lines
            if s.startswith("#") and not s.startswith("#error")}
    errors = [s for s in lines if s.startswith("#error")]
    if errors or len(classes) != len(x) or "stack" not in info:
        raise NasoptError(f"the Cortex-M4 run printed {len(classes)} classes for {len(x)} "
                          f"samples{': ' + errors[0][7:] if errors else ''}")
    hi, lo = info["predict_ticks"]
    ticks = (hi << 32) | lo
    spin_insns, spin_ticks = info["spin"]
    per_tick = spin_insns / max(spin_ticks, 1)
    stack = info["stack"][0]
    return M4Result(classes, sizes["flash"], sizes["code"], sizes["const"],
                    sizes["static_ram"] + stack, sizes["static_ram"], stack,
                    ticks * per_tick / len(x), total_text, len(x))


@contextlib.contextmanager
def _m4_image(folder: str | Path) -> Iterator[Path]:
    """A temporary folder holding ``folder``'s model.c and model.h with the harness, compiled
    and linked as ``image.elf`` for the Cortex-M4."""
    with tempfile.TemporaryDirectory(prefix="nasopt-m4-") as tmp_name:
        tmp = Path(tmp_name)
        for name in ("model.h", "model.c"):
            shutil.copy2(Path(folder) / name, tmp / name)
        for name in ("m4_startup.c", "m4_main.c", "m4.ld"):
            (tmp / name).write_text(_harness(name))
        _m4_link(tmp)
        yield tmp


def _m4_link(tmp: Path) -> None:
    """Compile model.c and the harness in ``tmp`` for the Cortex-M4 and link ``image.elf``."""
    gcc = "arm-none-eabi-gcc"
    for src in ("model.c", "m4_main.c", "m4_startup.c"):
        _run([gcc, *M4_FLAGS, "-Werror", "-c", src, "-o", src[:-2] + ".o"], tmp,
             f"building {src} for the Cortex-M4")
    _run([gcc, *M4_FLAGS, "-nostartfiles", "--specs=rdimon.specs", "-T", "m4.ld",
          "-Wl,--gc-sections", "-Wl,-Map=image.map", "m4_startup.o", "m4_main.o", "model.o",
          "-lrdimon", "-o", "image.elf"], tmp, "linking the Cortex-M4 image")


def m4_sizes(folder: str | Path) -> dict[str, int]:
    """The flash and static RAM of ``folder``'s model.c in a linked Cortex-M4 image, as
    :func:`m4_run` measures them, without running it: ``flash`` (model.o's code, constants and
    initialized data, plus the library routines it calls), ``code``, ``const``,
    ``static_ram`` (.data + .bss)."""
    _need("arm-none-eabi-gcc", "arm-none-eabi-nm",
          hint=f"install the Cortex-M4 toolchain and emulator: {APT}")
    with _m4_image(folder) as tmp:
        return _model_sizes(tmp)


_MAP_LINE = re.compile(r"^\s*(\.[\w.$]+)?\s+0x([0-9a-f]+)\s+0x([0-9a-f]+)\s+(\S+)$")


def _model_sizes(tmp: Path) -> dict[str, int]:
    """Bytes of model.o in the linked image (from the link map), plus the library routines it
    calls (from the image's symbol table)."""
    code = const = data = bss = 0
    section = None
    for line in (tmp / "image.map").read_text().splitlines():
        if line.startswith("Discarded input sections"):
            section = "discarded"
        if line.startswith("Linker script and memory map"):
            section = None
        if section == "discarded":
            continue
        head = re.match(r"^ (\.[\w.$]+)", line)
        if head:
            section = head.group(1)
        m = _MAP_LINE.match(line)
        if not m or not m.group(4).endswith("model.o") or int(m.group(2), 16) == 0:
            continue
        name = m.group(1) or section or ""
        size = int(m.group(3), 16)
        if name.startswith(".text"):
            code += size
        elif name.startswith(".rodata"):
            const += size
        elif name.startswith(".data"):
            data += size
        elif name.startswith(".bss") or name.startswith("COMMON"):
            bss += size
    undefined = _run(["arm-none-eabi-nm", "-u", "model.o"], tmp, "nm").split()
    undefined = [u for u in undefined if u != "U"]
    library = 0
    if undefined:
        table = _run(["arm-none-eabi-nm", "-S", "image.elf"], tmp, "nm")
        for row in table.splitlines():
            parts = row.split()
            if len(parts) == 4 and parts[3] in undefined:
                library += int(parts[1], 16)
    return {"flash": code + const + data + library, "code": code + library, "const": const,
            "static_ram": data + bss}


def check_ram(plan: Mapping[str, Any], ram_bytes: int | None) -> None:
    """One clear error when the plan's activation arena alone exceeds ``ram_bytes``."""
    from nasopt.deploy.firmware.c_export import plan_arena
    arena = plan_arena(plan)[1]
    if ram_bytes is not None and arena > ram_bytes:
        raise NasoptError(f"the C model's activation arena needs {arena} B, more than the "
                          f"{ram_bytes} B of RAM allowed; choose an arch with narrower layers "
                          f"or search with an sram budget")


def verify(folder: str | Path, x: np.ndarray, y: np.ndarray | None = None,
           emulator: bool = True, emulator_samples: int | None = None,
           ram_bytes: int | None = None, timeout: float = 600) -> dict[str, Any]:
    """Check a C export folder on raw samples ``x``: the host build's logits against the NumPy
    reference (bit for bit), and with ``emulator`` the Cortex-M4 build's classes in QEMU (the
    first ``emulator_samples`` samples, default all) against both. Accuracies when labels ``y``
    are given; the M4 measurements. A disagreement is an error naming the count."""
    from nasopt.deploy.firmware import reference
    from nasopt.deploy.firmware.c_export import PLAN
    folder = Path(folder)
    plan = reference.load(folder / PLAN)
    check_ram(plan, ram_bytes)
    x = np.asarray(x, np.float32)
    ref = reference.run(plan, x)
    host = host_logits(folder, x, plan["num_classes"])
    differ = int((ref != host).any(axis=1).sum())
    if differ:
        raise NasoptError(f"the host build of {folder}/model.c differs from the NumPy reference "
                          f"on {differ} of {len(x)} samples")
    out: dict[str, Any] = {"samples": len(x), "host_equals_reference": True}
    if y is not None:
        out["reference_accuracy"] = float((ref.argmax(1) == np.asarray(y)).mean())
    if emulator:
        n = len(x) if emulator_samples is None else min(emulator_samples, len(x))
        m4 = m4_run(folder, x[:n], timeout)
        wrong = int((m4.classes != ref[:n].argmax(1)).sum())
        if wrong:
            raise NasoptError(f"the Cortex-M4 build of {folder}/model.c printed {wrong} of {n} "
                              f"classes that differ from the host's and the reference's")
        out.update({k: v for k, v in m4.to_dict().items() if k != "samples"},
                   m4_samples=n, m4_equals_host=True)
        if y is not None:
            out["m4_accuracy"] = float((m4.classes == np.asarray(y)[:n]).mean())
    return out
