"""``router.form: native`` for every family: a native distil of the tiny model → ``export_checkpoint`` → stock
``from_pretrained`` in a fresh process (all checkpoints in one interpreter that cannot import this project)
routes as the in-memory native routers do (float32 logits ≤ 1e-5, identical top-k), not as the original
gates do, and only the family's router tensors changed (``pipeline.testing.tiny_native``)."""

from __future__ import annotations

import pytest

from pipeline.moe.families import FAMILIES
from pipeline.router.native import drop_in_form
from pipeline.testing.tiny_data import build_tiny_tokenizer, make_texts
from pipeline.testing.tiny_native import check_native_checkpoints, native_passes, routing_moved

ALL = sorted(FAMILIES)
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def checked(tmp_path_factory, tiny_corpus) -> dict[str, dict]:
    """Every family natively distilled, exported and loaded by stock transformers (one fresh interpreter)."""
    tokenizer = build_tiny_tokenizer(make_texts(40))
    return check_native_checkpoints(ALL, tmp_path_factory.mktemp("native-families"), tokenizer, tiny_corpus)


@pytest.mark.parametrize("family", ALL)
def test_stock_from_pretrained_routes_as_the_native_routers(checked, family):
    result = checked[family]
    assert "error" not in result, result
    assert result["project_modules_imported"] == [] and result["stock_modules"] == ["transformers"]
    assert not (result["missing_keys"] or result["unexpected_keys"] or result["mismatched_keys"]), result
    assert result["logits_max_abs_diff"] <= 1e-5 and result["indices_equal"], result
    assert routing_moved(result), result  # not the original gates' routing
    # only router tensors changed bytes: the weight of every router, the family's bias where it has one
    assert result["differing_outside_routers"] == [] and result["differing_tensors"] == result["router_tensors"]
    assert result["form"] == drop_in_form(FAMILIES[family]) and native_passes(result)
