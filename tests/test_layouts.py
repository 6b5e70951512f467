"""Layouts as data: stages of whole layers, checked, parsed from --layout, cut by capacity."""

from __future__ import annotations

import pytest

from edgeweave.splitting import layouts
from edgeweave.splitting.layouts import Layout, LayoutError, Stage, parse_layout, split_layers


def test_kinds_and_descriptions():
    assert layouts.tensor(30, 1).kind == "single"
    assert layouts.tensor(30, 3).describe() == "tensor x3"
    assert layouts.pipeline([15, 15]).describe() == "pipeline 0-14|15-29"
    mixed = layouts.hybrid([12, 18], [2, 1])
    assert mixed.kind == "hybrid" and mixed.describe() == "hybrid 0-11 x2|12-29"
    assert mixed.layers_of(1) == (0, 12) and mixed.layers_of(2) == (12, 30)
    assert Layout.from_dict(mixed.to_dict()) == mixed


@pytest.mark.parametrize(("stages", "message"), [
    (((0, 10), (0,)), "model has 30"),
    (((1, 30), (0,)), "continue at layer 0"),
])
def test_a_layout_must_cover_every_layer_once(stages, message):
    with pytest.raises(LayoutError, match=message):
        Layout((Stage(*stages),)).check(30, 1)


def test_a_layout_must_name_every_node_once():
    with pytest.raises(LayoutError, match="exactly once"):
        Layout((Stage((0, 15), (0,)), Stage((15, 30), (0,)))).check(30, 2)


def test_split_layers_follows_capacity_and_memory_limits():
    assert split_layers(30, [1, 1]) == [15, 15]
    assert split_layers(30, [2, 1, 1]) == [15, 8, 7]
    assert split_layers(30, [1, 1], limits=[10, 30]) == [10, 20]  # the small node holds 10 at most
    assert sum(split_layers(22, [3.3, 1.1, 0.7, 2.0])) == 22
    with pytest.raises(LayoutError, match="at most 12 of 30"):
        split_layers(30, [1, 1], limits=[6, 6])
    with pytest.raises(LayoutError, match="at least one layer"):
        split_layers(2, [1, 1, 1])


def test_parse_layout():
    assert parse_layout("Tensor") == "tensor" and parse_layout("pipeline") == "pipeline"
    assert parse_layout("pipeline:12,18") == layouts.pipeline([12, 18])
    assert parse_layout("hybrid:12x2,18x1") == layouts.hybrid([12, 18], [2, 1])
    for bad in ("ring", "pipeline:", "pipeline:12x2", "hybrid:12,x", "pipeline:0,30"):
        with pytest.raises(LayoutError):
            parse_layout(bad)
