"""The space contract (nasopt.testing) over every shipped space, through the shipped pytest base
class, and `nasopt check-space` on a user's space that breaks a rule."""
from __future__ import annotations

from pathlib import Path

import pytest

from nasopt.cli import main as cli
from nasopt.core.space_import import load_space_class
from nasopt.testing import SpaceContract, check_space
from nasopt.spaces import SPACES


class TestConv1d(SpaceContract):
    space_class = SPACES["conv1d"]


class TestMobileNet(SpaceContract):
    space_class = SPACES["mobilenet"]
    input_shape = (1, 12, 12)


class TestNb201(SpaceContract):
    space_class = SPACES["nb201"]


class TestTinyMLPExample(SpaceContract):
    space_class = load_space_class(str(Path(__file__).resolve().parents[1] / "examples" /
                                       "tiny_mlp_space.py") + ":TinyMLPSpace")
    input_shape = (1, 8, 8)


def test_every_shipped_space_has_a_contract_test():
    tested = {c.space_class for c in (TestConv1d, TestMobileNet, TestNb201)}
    assert tested == set(SPACES.values())


BROKEN = '''import torch
from nasopt.spaces.conv1d import Conv1dSpace


class Doubled(torch.nn.Module):
    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        return 2 * self.net(x)

    def state_dict(self, *args, **kwargs):
        return self.net.state_dict(*args, **kwargs)

    def load_state_dict(self, *args, **kwargs):
        return self.net.load_state_dict(*args, **kwargs)


class BrokenExtract(Conv1dSpace):
    """Its standalone network is not the subnet the supernet computes."""
    name = "broken-extract"

    def build(self, arch):
        return Doubled(super().build(arch))


class Fine(Conv1dSpace):
    name = "fine-conv1d"
'''


def test_check_space_names_the_broken_rule(tmp_path, capsys):
    (tmp_path / "spaces.py").write_text(BROKEN)
    code = cli.main(["check-space", f"{tmp_path / 'spaces.py'}:BrokenExtract"])
    out = capsys.readouterr().out
    assert code == 1
    assert "extract      FAIL: an extracted subnet differs from the supernet" in out
    assert "sample       ok" in out and "BrokenExtract: 1 of the contract's rules failed" in out
    assert cli.main(["check-space", f"{tmp_path / 'spaces.py'}:Fine"]) == 0
    assert "Fine: every rule of the space contract holds" in capsys.readouterr().out


def test_check_space_reports_a_space_that_cannot_be_built():
    class NoShape(SPACES["conv1d"]):
        name = "no-shape"
    failures = check_space(NoShape, input_shape=(3, 4, 5, 6))
    assert failures and failures[0].rule == "construct"


@pytest.mark.parametrize("argv, message", [
    (["check-space", "conv1d", "--input-shape", "1,x"], "give whole numbers"),
    (["check-space", "resnet"], "unknown space 'resnet'"),
])
def test_check_space_bad_input(capsys, argv, message):
    assert cli.main(argv) == 2 and message in capsys.readouterr().err
