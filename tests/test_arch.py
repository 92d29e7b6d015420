import json

import pytest

from nasopt.core.arch import Arch


def test_key_is_canonical_and_order_free():
    a = Arch({"s1.k": 5, "s1.depth": 2})
    b = Arch({"s1.depth": 2, "s1.k": 5})
    assert a == b and hash(a) == hash(b)
    assert a.key == '{"s1.depth":2,"s1.k":5}'
    assert a != Arch({"s1.depth": 2, "s1.k": 3})


def test_json_round_trip_is_exact(tmp_path):
    a = Arch({"s1.depth": 2, "s1.keep": 0.75, "act": "relu", "flag": True})
    assert Arch.from_json(a.to_json()) == a
    a.save(tmp_path / "a.json")
    back = Arch.load(tmp_path / "a.json")
    assert back.key == a.key and type(back["s1.keep"]) is float
    assert json.loads((tmp_path / "a.json").read_text())["s1.depth"] == 2


def test_rejects_non_json_values():
    with pytest.raises(TypeError):
        Arch({"s1.k": [3, 5]})
    with pytest.raises(ValueError):
        Arch.from_json("[1, 2]")
