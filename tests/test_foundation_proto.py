"""The committed generated modules match what proto/generate.py produces from edgeweave.proto."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_generated_code_is_fresh(tmp_path):
    spec = importlib.util.spec_from_file_location("proto_generate", ROOT / "proto" / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    produced = module.generate(tmp_path)
    assert {p.name for p in produced} == set(module.GENERATED)
    for path in produced:
        committed = ROOT / "proto" / path.name
        assert path.read_bytes() == committed.read_bytes(), f"{path.name} is stale: run `make proto` and commit it"
