"""Configuration: defaults, YAML, overrides, and one-line errors that name the key."""

from __future__ import annotations

import pytest
import yaml

from pipeline.config import RunConfig, apply_overrides, build_config, parse_override, read_yaml, to_yaml
from pipeline.errors import LprError


def test_round_trip_through_yaml():
    cfg = build_config({"seed": 3, "dump": {"max_tokens": 10}})
    assert build_config(yaml.safe_load(to_yaml(cfg))) == cfg


def test_overrides_parse_yaml_values():
    data = apply_overrides({}, [parse_override("dump.max_tokens=1000"), parse_override("model.revision=main")])
    cfg = build_config(data)
    assert cfg.dump.max_tokens == 1000 and cfg.model.revision == "main"
    assert build_config(apply_overrides({}, [parse_override("dump.max_tokens=null")])).dump.max_tokens is None


@pytest.mark.parametrize(
    ("data", "needle"),
    [
        ({"dumpp": {}}, "unknown key 'dumpp'"),
        ({"dump": {"max_tokenz": 1}}, "unknown key 'dump.max_tokenz'"),
        ({"dump": {"batch_tokens": "many"}}, "'dump.batch_tokens'"),
        ({"corpus": {"heldout_fraction": 1.5}}, "'corpus.heldout_fraction'"),
        ({"demo": {"top_k": 20, "num_experts": 8}}, "demo.top_k=20 should be ≤ demo.num_experts=8"),
        (
            {"dump": {"batch_tokens": 16}, "corpus": {"seq_len": 64}},
            "dump.batch_tokens=16 should be ≥ corpus.seq_len=64",
        ),
    ],
)
def test_bad_values_name_the_key(data, needle):
    with pytest.raises(LprError, match=None) as err:
        build_config(data)
    assert needle in str(err.value)
    assert "\n" not in str(err.value)


def test_all_problems_in_one_message():
    with pytest.raises(LprError) as err:
        build_config({"dump": {"max_tokenz": 1, "batch_tokens": "x"}})
    assert "max_tokenz" in str(err.value) and "batch_tokens" in str(err.value)


def test_bad_override_and_files(tmp_path):
    with pytest.raises(LprError, match="is not KEY=VALUE"):
        parse_override("dump.max_tokens")
    with pytest.raises(LprError, match="does not exist"):
        read_yaml(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed")
    with pytest.raises(LprError, match="is not valid YAML"):
        read_yaml(bad)
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("42")
    with pytest.raises(LprError, match="mapping"):
        read_yaml(scalar)


def test_defaults_are_the_demo():
    cfg = RunConfig()
    assert cfg.model.path == "demo" and cfg.corpus.source == "demo" and not cfg.model.trust_remote_code
