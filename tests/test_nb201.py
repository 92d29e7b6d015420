"""The NAS-Bench-201 space (strings, the real network's counts) and the tabular mode (table
evaluator, `nasopt search --table`, its errors)."""
from __future__ import annotations

import random

import pandas as pd
import pytest
import torch

from nasopt import api
from nasopt.cli import main as cli
from nasopt.core.config import DEFAULT_TABLE
from nasopt.core.errors import NasoptError
from nasopt.core.metrics import count_macs, count_params
from nasopt.search.study import load_study, open_storage
from nasopt.search.tabular import TabularEvaluator, resolve_table
from nasopt.spaces.nb201 import CIFAR10_SHAPE, EDGES, Nb201Space, from_string, to_string

TABLE = resolve_table(DEFAULT_TABLE)  # the shipped NAS-Bench-201 CIFAR-10 table
ROW = ("|avg_pool_3x3~0|+|nor_conv_1x1~0|skip_connect~1|+|nor_conv_1x1~0|skip_connect~1|"
       "skip_connect~2|", 85.8633)  # the table's first row


@pytest.fixture(scope="module")
def space() -> Nb201Space:
    return Nb201Space(CIFAR10_SHAPE, 10)


def uniform(op: str) -> dict[str, str]:
    return {e: op for e in EDGES}


def test_string_round_trip(space):
    rng = random.Random(0)
    for _ in range(50):
        arch = space.sample(rng)
        assert space.parse_arch(space.arch_string(arch)) == arch
    for text in pd.read_csv(TABLE, nrows=30)["arch"]:
        assert to_string(from_string(text)) == text
    arch = from_string(ROW[0])
    assert arch["e1_0"] == "avg_pool_3x3" and arch["e2_1"] == "skip_connect"
    assert arch["e3_0"] == "nor_conv_1x1" and len(arch) == 6


@pytest.mark.parametrize("text, message", [
    ("|none~0|+|none~0|none~1|", "needs 3"),
    ("|none~0|+|none~0|+|none~0|none~1|none~2|", "node 2"),
    ("|none~0|+|none~0|conv~1|+|none~0|none~1|none~2|", "bad edge 'conv~1'"),
    ("|none~0|+|none~1|none~0|+|none~0|none~1|none~2|", "write OP~0"),
])
def test_bad_strings_name_the_format(text, message):
    with pytest.raises(NasoptError, match=message):
        from_string(text)


def test_one_cell_hand_count(space):
    """All-none cells hold no weights; a 3x3 ReLU-Conv-BN edge holds C*C*9 + 2C (BN affine),
    on 6 edges x 5 cells per stage, C = 16, 32, 64; a 1x1 edge C*C + 2C."""
    none = count_params(space.build(uniform("none")))
    conv3 = count_params(space.build(uniform("nor_conv_3x3")))
    assert none == 73306
    assert conv3 - none == sum(6 * 5 * (c * c * 9 + 2 * c) for c in (16, 32, 64))
    assert conv3 == 1531546  # NAS-Bench-201's figure for its largest cell: 1.53 M params
    one_1x1 = count_params(space.build({**uniform("none"), "e2_1": "nor_conv_1x1"}))
    assert one_1x1 - none == sum(5 * (c * c + 2 * c) for c in (16, 32, 64))
    # pooling and skip add no weights
    assert count_params(space.build(uniform("avg_pool_3x3"))) == none
    assert count_params(space.build(uniform("skip_connect"))) == none


def test_network_forward_and_ends(space):
    assert space.smallest() == uniform("none") and space.largest() == uniform("nor_conv_3x3")
    model = space.build(from_string(ROW[0]))
    out = model(torch.randn(2, *CIFAR10_SHAPE))
    assert out.shape == (2, 10) and torch.isfinite(out).all()
    # the none op outputs zeros: with all-none cells the logits do not depend on the input
    model = space.build(uniform("none")).eval()
    with torch.no_grad():
        a, b = model(torch.randn(1, *CIFAR10_SHAPE)), model(torch.randn(1, *CIFAR10_SHAPE))
    assert torch.equal(a, b)


def test_restrict_and_sample(space):
    sub = space.restrict({"e1_0": ["nor_conv_3x3", "skip_connect"], "e3_2": ["none"]})
    assert sub.genes["e1_0"] == ("skip_connect", "nor_conv_3x3") and sub.size() == 2 * 5 ** 4
    rng = random.Random(1)
    for _ in range(40):
        arch = sub.sample(rng)
        assert arch["e1_0"] in ("skip_connect", "nor_conv_3x3") and arch["e3_2"] == "none"
    with pytest.raises(NasoptError, match="choose among"):
        space.restrict({"e1_0": ["conv_5x5"]})


def test_tabular_evaluator_reads_the_table_and_counts_the_network(space):
    evaluator = TabularEvaluator(space, TABLE)
    m = evaluator(from_string(ROW[0]))
    assert m.accuracy == pytest.approx(ROW[1] / 100)
    model = space.build(from_string(ROW[0]))
    assert (m.params, m.macs) == (count_params(model), count_macs(model, CIFAR10_SHAPE))
    assert m.float_bytes == 4 * m.params
    assert m.nonzero_params == m.params  # no pruning in a table's networks
    assert m.sources["accuracy"] == f"table: {TABLE} column cifar10_test_acc"
    # counts are cached per op multiset: an arch with the same ops elsewhere counts the same
    moved = from_string("|skip_connect~0|+|skip_connect~0|nor_conv_1x1~1|+|avg_pool_3x3~0|"
                        "skip_connect~1|nor_conv_1x1~2|")
    model = space.build(moved)
    assert evaluator.counts(moved) == (count_params(model), count_macs(model, CIFAR10_SHAPE))


def test_table_errors_name_the_fix(space, tmp_path):
    with pytest.raises(NasoptError, match="--table PATH"):
        TabularEvaluator(space, tmp_path / "missing.csv")
    with pytest.raises(NasoptError, match="--table-metric COLUMN .*cifar10_test_acc"):
        TabularEvaluator(space, TABLE, "cifar100_test_acc")
    small = tmp_path / "small.csv"
    small.write_text(f"arch,acc\n{ROW[0]},{ROW[1]}\n")
    with pytest.raises(NasoptError, match="is not in table"):
        TabularEvaluator(space, small, "acc")
    # a space restricted to the archs the table has is fine
    only = space.restrict({g: [v] for g, v in from_string(ROW[0]).items()})
    assert TabularEvaluator(only, small, "acc")(from_string(ROW[0])).accuracy == ROW[1] / 100
    fractions = tmp_path / "bad.csv"
    fractions.write_text(f"arch,acc\n{ROW[0]},{ROW[1] * 10}\n")
    with pytest.raises(NasoptError, match="in percent"):
        TabularEvaluator(only, fractions, "acc")


def search(tmp_path, *args: str) -> int:
    return cli.main(["search", "--space", "nb201", "--quiet", "--run-dir", str(tmp_path), *args])


def test_tabular_search_from_the_cli_continues_and_records_the_table(tmp_path, capsys):
    assert search(tmp_path, "--table", "--trials", "12", "--strategy", "evolution",
                  "--objectives", "accuracy,params") == 0
    assert "12 completed trials" in capsys.readouterr().out
    storage = open_storage(f"sqlite:///{tmp_path}/studies.db")
    first = [(t.params, t.values) for t in load_study(storage, "nb201-nb201_cifar10").trials]
    assert search(tmp_path, "--table", str(TABLE), "--trials", "20", "--strategy", "reinforce",
                  "--objectives", "accuracy,params") == 0
    study = load_study(storage, "nb201-nb201_cifar10")
    assert [(t.params, t.values) for t in study.trials][:12] == first and len(study.trials) == 20
    setup = study.user_attrs["nasopt"]
    assert setup["table"] == str(TABLE) and setup["table_metric"] == "cifar10_test_acc"
    assert "data" not in setup and "supernet" not in setup
    table = pd.read_csv(TABLE).set_index("arch")["cifar10_test_acc"]
    for t in study.trials:
        assert t.values[0] == pytest.approx(table[to_string(t.params)] / 100)
    capsys.readouterr()
    assert cli.main(["export", "nb201-nb201_cifar10", "--trial", "0", "--out",
                     str(tmp_path / "x"), "--run-dir", str(tmp_path)]) == 2
    assert "scored from the table" in capsys.readouterr().err


@pytest.mark.parametrize("args, message", [
    (["--space", "nb201"], "tabular mode: --table"),
    (["--space", "nb201", "--table", "nope.csv"], "give an existing CSV with --table PATH"),
    (["--space", "nb201", "--table", "--table-metric", "acc"], "has no column 'acc'"),
    (["--space", "conv1d", "--table"], "has no tabular mode"),
])
def test_cli_errors(tmp_path, capsys, args, message):
    code = cli.main(["search", *args, "--quiet", "--run-dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.startswith("nasopt: error:")


def test_space_description_round_trip(space):
    sub = space.restrict({"e2_0": ["none", "skip_connect"]})
    back = api.space_from_description(sub.describe(), api.SPACES)
    assert back.genes == sub.genes and type(back) is Nb201Space
