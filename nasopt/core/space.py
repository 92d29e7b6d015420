"""SearchSpace: the genes of one family of networks, sub-spaces, sampling and building.

A concrete space (in ``search_spaces/``) only says which genes exist and how to build its elastic
network for given dimensions; everything else (validation, restriction, sampling, the supernet)
is shared here so that knowledge of a space lives in exactly one module.
"""
from __future__ import annotations

import random
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

from torch import nn

from nasopt.core.arch import Arch, Value
from nasopt.core.errors import NasoptError
from nasopt.supernet.network import group_of

if TYPE_CHECKING:
    from nasopt.supernet.elastic import Supernet

Genes = dict[str, tuple[Value, ...]]


class SearchSpace(ABC):
    """One family of networks for a given input shape and number of classes.

    Subclasses define :meth:`architecture_genes` (every architecture gene with all its options,
    in a fixed order), optionally :meth:`compression_genes` (bit-widths, sparsity, rank ratios),
    and :meth:`network` (an elastic network sized for the given architecture gene values).
    ``build(arch)`` gives a standalone (uncompressed) model; ``supernet()`` a weight-sharing
    network sized for the largest option of every architecture gene. Compression genes do not
    change the supernet: they are applied to an extracted model by :mod:`nasopt.compression.compress`.
    With ``compression=False`` the space has architecture genes only.
    """

    name: ClassVar[str]
    #: rank of the per-sample input tensor the space accepts (2: (C, L) signals; 3: (C, H, W) images)
    input_rank: ClassVar[int | None] = None  # dims of one sample (2: signals, 3: images; None: any)
    #: the probability that a compression-aware supernet trains a random subnet of a step under
    #: drawn compression genes, unless the recipe sets ``supernet.compressed_share``: more
    #: compressed steps lift what heavily compressed archs inherit, fewer leave the float
    #: subnets more of the training (results/README.md measures both per shipped space)
    compressed_share: ClassVar[float] = 0.1

    def __init__(self, input_shape: Sequence[int], num_classes: int,
                 genes: Mapping[str, Sequence[Value]] | None = None, compression: bool = True):
        if not 0.0 <= self.compressed_share <= 1.0:
            raise NasoptError(f"space {self.name!r}: compressed_share is a probability; set it "
                              f"within 0..1, got {self.compressed_share}")
        self.compression = compression
        self.input_shape = tuple(int(s) for s in input_shape)
        self.num_classes = int(num_classes)
        if self.input_rank is not None and len(self.input_shape) != self.input_rank:
            kind = {2: "1-D signals shaped (channels, length)",
                    3: "images shaped (channels, height, width)"}[self.input_rank]
            raise NasoptError(
                f"space {self.name!r} takes {kind}, but the dataset's samples are shaped "
                f"{self.input_shape}; choose a space made for this data (see `nasopt spaces`); "
                f"a data file's x is read as (N, length) one-channel signals, (N, height, width) "
                f"or (N, channels, height, width) images, and as (N, channels, length) signals "
                f"when the .npz also holds layout='signals'")
        full = self.full_genes()
        self.genes: Genes = (self.default_genes() if genes is None
                             else self._checked_subset(full, genes))

    # ---- what a concrete space provides -------------------------------------------------
    @abstractmethod
    def architecture_genes(self) -> Genes:
        """Every architecture gene with all its options, smallest first."""

    def compression_genes(self) -> Genes:
        """Compression genes (``<group>.bits``, ``sparsity``, ``<group>.rank``,
        ``<group>.quant``); none by default.

        A group is a prefix of module names as given by :meth:`group_of`."""
        return {}

    def opt_in_genes(self) -> dict[str, Value]:
        """Genes a search leaves at one value unless it restricts them to more options
        (``--restrict s1.quant=uniform,codebook``), with that value: every ``<group>.quant`` at
        ``uniform``. Codebook quantization and the factorization of k-tap convolutions did not
        help at equal evaluations (``nasopt bench techniques``), and drawing them in supernet
        training costs the other archs accuracy; so a search uses them when asked."""
        return {g: "uniform" for g, options in self.full_genes().items()
                if g.endswith(".quant") and "uniform" in options}

    def default_genes(self) -> Genes:
        """The genes of the space a search uses by default: every option of every gene, but one
        (:meth:`opt_in_genes`) for the opt-in genes."""
        opt_in = self.opt_in_genes()
        return {g: ((opt_in[g],) if g in opt_in else tuple(o))
                for g, o in self.full_genes().items()}

    def full_space(self) -> "SearchSpace":
        """This space with every option of every gene, the opt-in genes' included."""
        return type(self)(self.input_shape, self.num_classes, self.full_genes(), self.compression)

    def gene_defaults(self) -> dict[str, Value]:
        """Genes that a description, an arch or a packed file may lack, with the value that
        reproduces what such a file meant: compression genes added in later versions (a rank
        ratio of 1, uniform quantization; :func:`nasopt.compression.compress.absent_value`)."""
        from nasopt.compression.compress import absent_value  # local: compress imports core
        return {g: v for g in self.full_genes() if (v := absent_value(g)) is not None}

    #: the gene group of a module by its name (:func:`nasopt.supernet.network.group_of`, the
    #: one rule: ``stages.<i>.…`` -> ``s<i+1>``, else its first name component)
    group_of = staticmethod(group_of)

    @abstractmethod
    def network(self, dims: Mapping[str, Value]) -> nn.Module:
        """The elastic network (an :class:`~nasopt.supernet.network.ElasticNetwork` for a
        weight-sharing space) whose layers are sized for ``dims`` (one value per gene)."""

    # ---- what a concrete space may provide (capabilities, with their defaults) --------------
    #: whether the space is searched on a weight-sharing supernet (False: tabular only)
    weight_sharing: ClassVar[bool] = True
    #: the (input shape, classes) of the networks a table was made for (tabular spaces)
    table_input: ClassVar[tuple[tuple[int, ...], int] | None] = None

    def arch_string(self, arch: Mapping[str, Value]) -> str | None:
        """The arch as a table row names it (tabular mode); None: the space has no table form."""
        return None

    def count_key(self, arch: Mapping[str, Value]) -> str:
        """A key equal for archs with equal parameter and MAC counts (counted once per key)."""
        return self.validate(arch).key

    def relax(self, supernet: "Supernet", sparsity: float | None = None, latency: Any = None,
              sram_dtype: str | None = None) -> nn.Module:
        """The continuous relaxation of this space's trained supernet for gradient search
        (DARTS, GDAS): a :class:`nasopt.gradient.search.Relaxation`. A space without one
        does not override this: the gradient strategies refuse it in one line."""
        type(self).check_relaxable()
        raise AssertionError("check_relaxable raises for a space that does not define relax")

    @classmethod
    def relaxable(cls) -> bool:
        """Whether the space defines :meth:`relax`."""
        return cls.relax is not SearchSpace.relax

    @classmethod
    def check_relaxable(cls) -> None:
        """The one line that refuses gradient search on a space without :meth:`relax`."""
        if not cls.relaxable():
            raise NasoptError(f"gradient search (darts, gdas) runs on a relaxation of the "
                              f"supernet; space {cls.name!r} has no relaxation (it defines no "
                              f"SearchSpace.relax; the shipped conv1d space does): use a "
                              f"sampling strategy for this space (see `nasopt strategies`)")

    # ---- shared behaviour -----------------------------------------------------------------
    def full_genes(self) -> Genes:
        """Every gene of the space (architecture, then compression) with all its options."""
        genes = dict(self.architecture_genes())
        if self.compression:
            genes.update(self.compression_genes())
        return genes

    def describe(self) -> dict[str, Any]:
        """JSON-able description, enough to rebuild the space with :func:`space_from_description`."""
        desc = {"name": self.name, "input_shape": list(self.input_shape),
                "num_classes": self.num_classes, "compression": self.compression,
                "genes": {g: list(opts) for g, opts in self.genes.items()}}
        spec = type(self).__dict__.get("import_spec")
        if spec:  # a user's space (nasopt.core.space_import): how a fresh process finds the class
            from nasopt.spaces import SPACES as SHIPPED
            if SHIPPED.get(self.name) is not type(self):
                desc["import"] = spec
        return desc

    def architecture_space(self) -> "SearchSpace":
        """This (sub-)space without compression genes: what the supernet is built on."""
        if not self.compression:
            return self
        names = self.architecture_genes()
        return type(self)(self.input_shape, self.num_classes,
                          {g: o for g, o in self.genes.items() if g in names}, compression=False)

    def architecture_of(self, arch: Mapping[str, Value]) -> Arch:
        """The architecture genes of ``arch`` (compression genes dropped)."""
        names = self.architecture_genes()
        return Arch({g: v for g, v in arch.items() if g in names})

    def size(self) -> int:
        n = 1
        for opts in self.genes.values():
            n *= len(opts)
        return n

    def restrict(self, restrictions: Mapping[str, Sequence[Value]]) -> "SearchSpace":
        """A sub-space whose listed genes take exactly the given options (among all the gene's
        options: an opt-in gene, :meth:`opt_in_genes`, is searched this way); the other genes keep
        this space's options."""
        genes = dict(self.genes)
        full = self.full_genes()
        for gene, options in restrictions.items():
            if gene not in genes:
                raise NasoptError(f"unknown gene {gene!r} for space {self.name!r}; "
                                  f"known genes: {', '.join(genes)}")
            kept = tuple(self._coerce(gene, o) for o in options)
            bad = [o for o in kept if o not in full[gene]]
            if bad:
                raise NasoptError(f"option(s) {bad} not available for gene {gene!r}; "
                                  f"choose among {list(full[gene])}")
            if not kept:
                raise NasoptError(f"restriction leaves gene {gene!r} with no option; "
                                  f"keep at least one of {list(full[gene])}")
            genes[gene] = tuple(o for o in full[gene] if o in kept)
        return type(self)(self.input_shape, self.num_classes, genes, self.compression)

    def validate(self, arch: Mapping[str, Value], strict: bool = False) -> Arch:
        """Return ``arch`` as an :class:`Arch` after checking every gene and option. CLI strings
        ("5") are parsed to the options' type; with ``strict`` (an arch read from a file) a
        value must already have that type."""
        unknown = sorted(set(arch) - set(self.genes))
        if unknown:
            raise NasoptError(f"unknown gene(s) {unknown} for space {self.name!r}; "
                              f"known genes: {', '.join(self.genes)}")
        defaults = self.gene_defaults()
        arch = {**{g: v for g, v in defaults.items() if g in self.genes and g not in arch
                   and v in self.genes[g]}, **arch}
        missing = [g for g in self.genes if g not in arch]
        if missing:
            raise NasoptError(f"arch lacks gene(s) {missing} of space {self.name!r}")
        values = {}
        for gene, opts in self.genes.items():
            if strict and isinstance(arch[gene], str) and not isinstance(opts[0], str):
                raise NasoptError(f"gene {gene!r} is the text {arch[gene]!r}, not a number; "
                                  f"write it without quotes, e.g. {opts[0]!r}")
            value = self._coerce(gene, arch[gene])
            if value not in opts:
                raise NasoptError(f"value {arch[gene]!r} is not an option of gene {gene!r} in "
                                  f"this space; choose among {list(opts)}")
            values[gene] = value
        return Arch(values)

    def sample(self, rng: random.Random) -> Arch:
        return Arch({g: rng.choice(opts) for g, opts in self.genes.items()})

    def largest(self) -> Arch:
        """The biggest architecture, least compressed (more sparsity means a smaller model)."""
        return Arch({g: (min if g.endswith("sparsity") else max)(o) for g, o in self.genes.items()})

    def smallest(self) -> Arch:
        """The smallest architecture, most compressed."""
        return Arch({g: (max if g.endswith("sparsity") else min)(o) for g, o in self.genes.items()})

    def build(self, arch: Mapping[str, Value]) -> nn.Module:
        """A standalone, uncompressed model for ``arch`` with freshly initialised weights
        (compression genes, if given, are ignored here: see :mod:`nasopt.compression.compress`)."""
        space = self.architecture_space()
        return self.network(space.validate(space.architecture_of(arch)))

    def supernet(self) -> "Supernet":
        from nasopt.supernet.elastic import Supernet  # local: supernet imports this module
        return Supernet(self)

    # ---- helpers ----------------------------------------------------------------------------
    def _coerce(self, gene: str, value: Any) -> Value:
        """Parse CLI strings ("5", "0.75") to the type of the gene's options."""
        kind = type(self.full_genes()[gene][0]) if gene in self.full_genes() else str
        if isinstance(value, kind) and not (kind is int and isinstance(value, bool)):
            return value
        try:
            if kind is int:
                as_float = float(value)
                if as_float != int(as_float):
                    raise ValueError
                return int(as_float)
            return kind(value)
        except (TypeError, ValueError):
            raise NasoptError(f"gene {gene!r} takes {kind.__name__} values, got {value!r}") from None

    def _checked_subset(self, full: Genes, genes: Mapping[str, Sequence[Value]]) -> Genes:
        defaults = self.gene_defaults()  # a description written before these genes existed
        genes = {**{g: (v,) for g, v in defaults.items() if g not in genes}, **genes}
        if set(genes) != set(full):
            raise NasoptError(f"space {self.name!r} has genes {list(full)}; got {list(genes)}")
        out: Genes = {}
        for g, opts in full.items():
            kept = tuple(o for o in opts if o in {self._coerce(g, v) for v in genes[g]})
            if not kept or len(kept) != len(set(genes[g])):
                raise NasoptError(f"gene {g!r} options {list(genes[g])} must be a non-empty "
                                  f"subset of {list(opts)}")
            out[g] = kept
        return out


def parse_restrictions(items: Sequence[str]) -> dict[str, list[str]]:
    """Parse CLI ``gene=a,b`` strings into a restriction mapping."""
    out: dict[str, list[str]] = {}
    for item in items:
        gene, sep, values = item.partition("=")
        if not sep or not gene.strip():
            raise NasoptError(f"bad restriction {item!r}; write it as GENE=OPT[,OPT...], "
                              f"e.g. s1.k=3,5")
        if gene.strip() in out:  # the last one would win in silence
            raise NasoptError(f"gene {gene.strip()!r} is restricted twice ({item!r} and an "
                              f"earlier one); give all its options once, e.g. "
                              f"{gene.strip()}=A,B")
        out[gene.strip()] = [v.strip() for v in values.split(",") if v.strip()]
    return out


def space_from_description(desc: Mapping[str, Any],
                           spaces: Mapping[str, type[SearchSpace]]) -> SearchSpace:
    """Rebuild a (sub-)space from :meth:`SearchSpace.describe` output (as a model card or a
    study records it); a damaged description is one clear error."""
    if not isinstance(desc, Mapping):
        raise NasoptError(f"the space description is {type(desc).__name__}, not a table of "
                          f"name, input_shape, num_classes and genes; the file is damaged")
    name = desc.get("name")
    if desc.get("import"):  # a user's space: found by the import spec it recorded
        from nasopt.core.space_import import load_space_class
        cls = load_space_class(str(desc["import"]))
    elif name in spaces:
        cls = spaces[name]
    else:
        raise NasoptError(f"unknown space {name!r}; known: {', '.join(spaces)}")
    shape, classes, genes = desc.get("input_shape"), desc.get("num_classes"), desc.get("genes")
    if (not isinstance(shape, (list, tuple)) or not shape
            or not all(isinstance(d, int) and d > 0 for d in shape)):
        raise NasoptError(f"space {name!r}: input_shape {shape!r} is not a list of positive "
                          f"integers; the file is damaged")
    if not isinstance(classes, int) or isinstance(classes, bool) or classes < 1:
        raise NasoptError(f"space {name!r}: num_classes {classes!r} (the outputs) is not a "
                          f"positive integer; the file is damaged")
    if genes is not None and not isinstance(genes, Mapping):
        raise NasoptError(f"space {name!r}: genes {genes!r} is not a table; the file is damaged")
    return cls(shape, classes, genes, desc.get("compression", True))
