"""Refactoring guard: the fast bench recipes on the real fixtures give the recorded model bytes (SHA-256).

Recorded by `python tools/golden_hashes.py --write`; a commit that changes a hash says why and what it measured.
Rows calibrated through ORT are compared only on the machine kind that recorded them (ORT version and CPU
vector ISA), since other float kernels can change their last bits; data-free rows are compared everywhere.
"""
import json

import pytest

from tests import golden_rows as gh

GOLDEN = json.loads(gh.GOLDEN.read_text())
SAME_MACHINE = GOLDEN["_machine"] == gh.machine()


@pytest.mark.parametrize("key,recipe", gh.rows("fast"), ids=[k for k, _ in gh.rows("fast")])
def test_fast_recipe_bytes_unchanged(key, recipe, minilm):
    row = GOLDEN[key]
    if not row["data_free"] and not SAME_MACHINE:
        pytest.skip(f"calibrated row recorded on {GOLDEN['_machine']}, this is {gh.machine()}")
    assert gh.row_hash(key.split("/")[-1], recipe) == row["sha256"], f"{key}: output bytes changed"


def test_golden_file_covers_every_row():
    assert {k for k, _ in gh.rows("all")} == set(GOLDEN) - {"_machine"}
