"""The engine's parts that reason about a network's modules (compression groups, latency
tables, peak memory, distillation hints) work for a space written outside nasopt: ``examples/tiny_mlp_space.py``, whose stages are single linear layers (no blocks) and
whose network-wide ``depth`` gene keeps the first stages."""
from __future__ import annotations

import random
import zlib
from pathlib import Path

import pytest
import torch

from nasopt.core.space_import import load_space_class

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "tiny_mlp_space.py"


@pytest.fixture(scope="module")
def space():
    return load_space_class(f"{EXAMPLE}:TinyMLPSpace")((1, 6, 6), 4)


def test_latency_table_covers_every_arch_and_predicts_a_synthetic_device_exactly(space):
    from nasopt.hardware import lut
    from nasopt.hardware.profile import load_profile

    def cost(key: str) -> float:
        return (zlib.crc32(key.encode()) % 997 + 3) / 1e4

    table = lut.build_table(space, load_profile("cpu-ort"), time_unit=lambda u: cost(u.key),
                            measure_arch=lambda a: (sum(cost(u.key) for u in lut.units(space, a))
                                                    + 0.01, 0.0), fit_archs=2)
    # the head's input is the last active stage's width: its genes include depth
    assert "depth" in table.positions["head"]["genes"]
    rng = random.Random(3)
    for _ in range(25):
        arch = space.sample(rng)
        units = lut.units(space, arch)
        assert len(units) == int(arch["depth"]) + 1
        assert table.predict(space, arch) == pytest.approx(
            sum(table.entries[u.key] for u in units) + table.constant)
        one_hot = {g: torch.tensor([1.0 if o == arch[g] else 0.0 for o in opts],
                                   dtype=torch.float64) for g, opts in space.genes.items()}
        assert float(table.expected_latency(one_hot)) == pytest.approx(
            table.predict(space, arch), rel=1e-9)


def test_peak_memory_of_an_arch_equals_the_hand_count(space):
    """int8 activations: the flattened input (36 B), then each layer's input and output live
    together; the head reads the last active stage."""
    from nasopt.hardware.memory import arch_peak_bytes

    arch = space.validate({**space.largest(), "depth": 2, "s1.width": 16, "s2.width": 32,
                           "s3.width": 64, "head.rank": 1.0})
    assert arch_peak_bytes(space, arch, "int8") == max(36 + 16, 16 + 32, 32 + 4)
    deeper = space.validate({**arch, "depth": 3})
    assert arch_peak_bytes(space, deeper, "int8") == 32 + 64


def test_groups_and_the_default_hint_layer(space):
    from nasopt.compression.compress import weight_layers
    from nasopt.deploy.distill import default_hint_layer

    model = space.build(space.largest())
    assert {space.group_of(n) for n, _ in weight_layers(model)} == {"s1", "s2", "s3", "head"}
    assert default_hint_layer(model) == "stages.2"
    assert default_hint_layer(space.build(space.smallest())) == "stages.0"
