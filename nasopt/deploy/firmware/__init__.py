"""The deployed model as integer C for a microcontroller.

- :mod:`~nasopt.deploy.firmware.reference`: the integer semantics, defined once (a *plan*: int8
  activations, weights at their searched bit-width, int32 accumulators, fixed-point
  requantization) and a NumPy implementation of it;
- :mod:`~nasopt.deploy.firmware.c_export`: the plan as ``model.h`` / ``model.c`` (C99, no dynamic
  memory, no dependency beyond the C library's headers);
- :mod:`~nasopt.deploy.firmware.toolchain`: builds the C on the host (gcc) and for a Cortex-M4
  run in QEMU (``mps2-an386``), and checks both against the NumPy reference.
"""
