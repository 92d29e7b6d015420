"""The search-space contract as a shipped check, for the spaces nasopt ships and for yours.

:func:`check_space` runs every rule on a :class:`~nasopt.core.space.SearchSpace` subclass and returns
what failed; ``nasopt check-space SPEC`` prints it; :class:`SpaceContract` is a pytest base
class (set ``space_class``; each rule is a test):

    from nasopt.testing import SpaceContract

    class TestMySpace(SpaceContract):
        space_class = MySpace

The rules, on random archs of the space with freshly initialised (or a trained supernet's)
weights:

- ``sample``: sampled archs have every gene, validate, and survive a JSON round trip;
  ``largest`` and ``smallest`` are valid archs; restricting a gene to one option keeps only it;
- ``build``: ``build(arch)`` maps ``(N, *input_shape)`` to finite ``(N, num_classes)`` logits;
- ``extract`` (weight-sharing spaces): the extracted subnet computes exactly what the supernet
  computes with the arch activated (max abs difference < 1e-5), and activation is scoped;
- ``recalibrate``: BatchNorm recalibration of an extracted subnet leaves finite outputs;
- ``packed``: the compressed model's packed file is exactly ``predicted_size`` bytes and loads
  back to the same outputs;
- ``export``: an export folder written and loaded back (``nasopt.load``) gives the same outputs;
- ``compressed`` (weight-sharing spaces with compression genes): the compressed forward a
  compression-aware supernet trains with (:func:`nasopt.supernet.compressed.compressed_forward`,
  BatchNorm in eval mode) computes the deployed model's outputs: the network's weight layers
  are elastic layers, and every BatchNorm follows the conv it folds into.
"""
from __future__ import annotations

import random
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from nasopt.core.arch import Arch
from nasopt.core.space import SearchSpace

#: outputs of two computations of one model agree within this
TOLERANCE = 1e-5


@dataclass(frozen=True)
class Failure:
    rule: str
    message: str


def default_input_shape(cls: type[SearchSpace]) -> tuple[int, ...]:
    """An input a space of this rank takes: (1, 40) signals or (1, 28, 28) images; a tabular
    space says its own (``table_input``)."""
    if cls.table_input is not None:
        return tuple(cls.table_input[0])
    return (1, 28, 28) if cls.input_rank == 3 else (1, 40)


class _Checks:
    """The rules on one space instance (``space``) and random inputs."""

    def __init__(self, space: SearchSpace, samples: int, seed: int):
        self.space = space
        self.rng = random.Random(seed)
        self.archs = [space.sample(self.rng) for _ in range(samples)]
        gen = torch.Generator().manual_seed(seed)
        self.x = torch.randn((16, *space.input_shape), generator=gen)

    def sample(self) -> None:
        space = self.space
        for arch in [*self.archs, space.largest(), space.smallest()]:
            assert set(arch) == set(space.genes), f"arch genes {sorted(arch)} != space genes"
            back = space.validate(Arch.from_json(space.validate(arch).to_json()))
            assert back == arch, f"{dict(arch)} changed in a JSON round trip: {dict(back)}"
        gene, opts = next(iter(space.genes.items()))
        sub = space.restrict({gene: [opts[0]]})
        drawn = {sub.sample(self.rng)[gene] for _ in range(10)}
        assert drawn == {opts[0]}, f"restricting {gene} to {opts[0]!r} still drew {drawn}"

    def build(self) -> None:
        for arch in self.archs[:3]:
            with torch.no_grad():
                out = self.space.build(arch).eval()(self.x)
            want = (len(self.x), self.space.num_classes)
            assert tuple(out.shape) == want, f"build({dict(arch)}) gave {tuple(out.shape)}, " \
                                             f"not {want}"
            assert torch.isfinite(out).all(), f"build({dict(arch)}) gave non-finite outputs"

    def _supernet(self):  # noqa: ANN202
        if not self.space.weight_sharing:
            return None
        from nasopt.supernet.elastic import recalibrate_bn
        supernet = self.space.supernet().eval()
        recalibrate_bn(supernet, self.x)  # non-trivial BN statistics
        return supernet.eval()

    def extract(self) -> None:
        supernet = self._supernet()
        if supernet is None:
            return
        with torch.no_grad():
            full = supernet(self.x)
            worst = 0.0
            for arch in self.archs:
                with supernet.activate(arch):
                    expected = supernet(self.x)
                got = supernet.extract(arch).eval()(self.x)
                worst = max(worst, (expected - got).abs().max().item())
            again = supernet(self.x)
        assert worst < TOLERANCE, (f"an extracted subnet differs from the supernet with its arch "
                                   f"activated by {worst:.3g} (> {TOLERANCE}): extract and "
                                   f"activate must compute the same subnet")
        assert torch.equal(full, again), "activate() did not restore the full supernet after it"

    def recalibrate(self) -> None:
        supernet = self._supernet()
        if supernet is None:
            return
        from nasopt.supernet.elastic import recalibrate_bn
        model = supernet.extract(self.archs[0])
        recalibrate_bn(model, self.x)
        with torch.no_grad():
            assert torch.isfinite(model.eval()(self.x)).all(), "non-finite after recalibration"

    def _compressed(self, arch: Arch):  # noqa: ANN202
        from nasopt.compression.compress import Policy, compress
        model = self.space.build(arch).eval()
        from nasopt.supernet.elastic import recalibrate_bn
        recalibrate_bn(model, self.x)
        return compress(model.eval(), Policy.from_arch(arch), self.space.group_of)

    def packed(self) -> None:
        from nasopt.compression import packed
        spaces = {**_shipped(), self.space.name: type(self.space)}
        for arch in self.archs[:4]:
            model, stored = self._compressed(arch)
            data = packed.pack(self.space, arch, stored)
            predicted = packed.predicted_size(self.space, arch, stored)
            assert len(data) == predicted, (f"packed file of {dict(arch)} has {len(data)} B, "
                                            f"predicted_size says {predicted} B")
            loaded, back = packed.unpack(data, spaces)
            assert back == arch, "the packed header did not give the arch back"
            with torch.no_grad():
                diff = (model(self.x) - loaded(self.x)).abs().max().item()
            assert diff < TOLERANCE, f"the packed file loads to outputs off by {diff:.3g}"

    def compressed(self) -> None:
        from nasopt.compression.compress import Policy, compress, weight_layers
        from nasopt.supernet.compressed import compressed_forward
        from nasopt.supernet.elastic import recalibrate_bn
        for arch in self.archs[:4]:
            model = self.space.build(arch)
            recalibrate_bn(model, self.x)
            model.eval()
            plain = [n for n, m in weight_layers(model) if not hasattr(m, "compression")]
            assert not plain, (f"weight layers {plain[:3]} are not elastic layers: a "
                               f"compression-aware supernet cannot train them compressed; build "
                               f"them from nasopt's Elastic* layers")
            policy = Policy.from_arch(arch)
            deployed, _ = compress(model, policy, self.space.group_of)
            with torch.no_grad(), compressed_forward(model, policy, self.space.group_of, self.x):
                ours = model(self.x)
                diff = (ours - deployed(self.x)).abs().max().item()
            scale = max(1.0, deployed(self.x).abs().max().item()) if diff else 1.0
            assert diff < 1e-4 * scale, (
                f"the compressed forward of {dict(arch)} differs from its deployed model by "
                f"{diff:.3g}: every BatchNorm must follow the conv it normalises")

    def export(self) -> None:
        from nasopt.deploy.export import export_model, load
        spaces = {**_shipped(), self.space.name: type(self.space)}
        arch = self.archs[0]
        model, stored = self._compressed(arch)
        with tempfile.TemporaryDirectory() as tmp:
            out = export_model(model, stored, arch, self.space, Path(tmp) / "model",
                               {"weights": "inherited"}, spaces)
            with torch.no_grad():
                diff = (model(self.x) - load(out, spaces)(self.x)).abs().max().item()
        assert diff < TOLERANCE, f"the export loads to outputs off by {diff:.3g}"


def _shipped() -> dict[str, type[SearchSpace]]:
    from nasopt.spaces import SPACES
    return dict(SPACES)


#: every rule, in the order they run
RULES: tuple[str, ...] = ("sample", "build", "extract", "recalibrate", "packed", "export",
                          "compressed")


def check_space(cls: type[SearchSpace], input_shape: tuple[int, ...] | None = None,
                num_classes: int = 10, samples: int = 8, seed: int = 0,
                rules: tuple[str, ...] = RULES) -> list[Failure]:
    """Run the contract's ``rules`` on the space class ``cls``; the failures (empty: it holds).
    A rule that raises fails with the exception as its message."""
    try:
        # every option, the opt-in genes' too: a user may search any of them
        space = cls(tuple(input_shape or default_input_shape(cls)), num_classes).full_space()
        checks = _Checks(space, samples, seed)
    except Exception as exc:  # noqa: BLE001 - reported, not raised
        return [Failure("construct", f"{type(exc).__name__}: {exc}")]
    failures = []
    for rule in rules:
        if rule in ("packed", "export", "compressed") and not (space.compression
                                                                and space.compression_genes()):
            continue  # no compression genes: nothing is packed (nb201 is searched from a table)
        if rule in ("export", "compressed") and not cls.weight_sharing:
            continue  # a space without a supernet is exported from a table: no model to export
        try:
            getattr(checks, rule)()
        except AssertionError as exc:
            failures.append(Failure(rule, str(exc)))
        except Exception as exc:  # noqa: BLE001 - reported, not raised
            failures.append(Failure(rule, f"{type(exc).__name__}: {exc}"))
    return failures


class SpaceContract:
    """A pytest base class: subclass it, set ``space_class`` (and ``input_shape`` if the default
    does not fit), and every rule of :func:`check_space` is a test of your space."""

    space_class: type[SearchSpace]
    input_shape: tuple[int, ...] | None = None
    num_classes: int = 10

    def _rule(self, rule: str) -> None:
        failures = check_space(self.space_class, self.input_shape, self.num_classes,
                               rules=(rule,))
        assert not failures, "; ".join(f"{f.rule}: {f.message}" for f in failures)

    def test_sample(self) -> None:
        self._rule("sample")

    def test_build(self) -> None:
        self._rule("build")

    def test_extract(self) -> None:
        self._rule("extract")

    def test_recalibrate(self) -> None:
        self._rule("recalibrate")

    def test_packed(self) -> None:
        self._rule("packed")

    def test_export(self) -> None:
        self._rule("export")

    def test_compressed(self) -> None:
        self._rule("compressed")

