"""Fuzzing (issue 9, item 5): the config loader and the corpus readers, on any input, give either a
valid result or an ``LprError`` with a one-line message — never another exception (which the CLI
would show as a bare type name, or as a traceback under ``--debug``).

Hypothesis runs derandomized (the same examples on every machine, so CI does not flake), with
modest example counts so the module takes seconds; ``@example`` pins inputs that once crashed.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from pipeline.config import RunConfig, apply_overrides, build_config, parse_override, parse_yaml, read_yaml
from pipeline.data.corpus import describe_corpus, iter_documents
from pipeline.errors import LprError

FUZZ = settings(
    max_examples=150, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow], database=None
)


def _lpr_error_or(fn, *args: Any, **kwargs: Any) -> Any:
    """``fn(...)``'s result, or None when it raised an LprError whose message is one non-empty line."""
    try:
        return fn(*args, **kwargs)
    except LprError as err:
        text = str(err)
        assert text and "\n" not in text and text.endswith("."), repr(text)
        return None


# --- the config -----------------------------------------------------------------------------

SECTIONS = ["model", "corpus", "dump", "cluster", "router", "distill", "validate", "demo", "flow", "seed"]
KEYS = ["path", "seq_len", "max_tokens", "latent_dim", "balance", "steps", "top_k", "num_experts", "dtype", "x"]
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.sampled_from(["auto", "float16", "cosine", "demo", "1e3", "nan", "-1", "0x10", ""]),
)
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=8,
)
config_dicts = st.dictionaries(
    st.sampled_from(SECTIONS) | st.text(max_size=8),
    st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=8), values, max_size=4) | values,
    max_size=5,
)


@FUZZ
@given(
    text=st.text(max_size=200) | st.sampled_from(["- a\n- b", "a: [1, 2", "!!python/object:os.system x", "2001-13-41"])
)
@example(text="seed: 2001-02-30")  # a timestamp-looking value that is not a date
@example(text="[" * 2000)  # nesting deeper than the parser's stack
@example(text="a: &x [*x]")
@example(text="{1: 2}")
def test_parse_yaml_gives_a_mapping_or_an_lpr_error(text):
    data = _lpr_error_or(parse_yaml, text, origin="fuzz.yaml")
    assert data is None or isinstance(data, dict)
    if data is not None:
        cfg = _lpr_error_or(build_config, data, origin="fuzz.yaml")
        assert cfg is None or isinstance(cfg, RunConfig)


@FUZZ
@given(raw=st.binary(max_size=300))
@example(raw=b"\xff\xfe\x00m\x00o")
@example(raw=b"model: {path: \x00}")
def test_read_yaml_on_any_bytes(raw):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "run.yaml"
        path.write_bytes(raw)
        data = _lpr_error_or(read_yaml, path)
        assert data is None or isinstance(data, dict)


@FUZZ
@given(data=config_dicts)
@example(data={1: 2})
@example(data={"model": {"path": None}})
@example(data={"seed": 2**70})
@example(data={"dump": {"batch_tokens": float("nan")}})
@example(data={"cluster": {"pca_rows": 10, "sample_rows": 2}})
def test_build_config_gives_a_config_or_an_lpr_error(data):
    cfg = _lpr_error_or(build_config, data, origin="fuzz")
    assert cfg is None or isinstance(cfg, RunConfig)


@FUZZ
@given(
    overrides=st.lists(
        st.text(max_size=30) | st.sampled_from(["dump.max_tokens=1e3", "a.b.c=[", "=1", "x="]), max_size=4
    )
)
@example(overrides=["seed.x=1"])
@example(overrides=["model=3", "model.path=x"])
def test_set_overrides_give_a_config_or_an_lpr_error(overrides):
    def resolve() -> RunConfig:
        return build_config(apply_overrides({}, [parse_override(text) for text in overrides]), origin="--set")

    cfg = _lpr_error_or(resolve)
    assert cfg is None or isinstance(cfg, RunConfig)


# --- the corpus readers ---------------------------------------------------------------------


def _read(source: Path, fmt: str, field: str = "text") -> None:
    """Everything a stage does with a corpus before the model: stream it, and count and hash it."""
    from pipeline.config import CorpusConfig

    cfg = CorpusConfig(source=str(source), format=fmt, text_field=field)
    docs = _lpr_error_or(lambda: list(iter_documents(cfg)))
    if docs is not None:
        assert all(isinstance(doc.text, str) and doc.text.strip() for _, doc in docs)
        _lpr_error_or(describe_corpus, cfg)


@FUZZ
@given(raw=st.binary(max_size=400), suffix=st.sampled_from([".txt", ".md", ".jsonl", ".json", ".parquet", ""]))
@example(raw=b"caf\xe9", suffix=".txt")
@example(raw=b"PAR1garbagePAR1", suffix=".parquet")
@example(raw=b'{"text": "\\ud800"}\n', suffix=".jsonl")
@example(raw=b"[" * 5000 + b"\n", suffix=".jsonl")
def test_any_bytes_as_any_corpus_file(raw, suffix):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"corpus{suffix}"
        path.write_bytes(raw)
        _read(path, "auto")
        _read(path, "text")
        _read(path, "jsonl")
        _read(path, "parquet")


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=6,
)


@FUZZ
@given(
    rows=st.lists(
        st.dictionaries(st.sampled_from(["text", "body", ""]) | st.text(max_size=5), json_values, max_size=3)
        | json_values,
        max_size=6,
    ),
    field=st.sampled_from(["text", "body", "missing"]),
)
@example(rows=[{"text": "\ud800 lone surrogate"}], field="text")
@example(rows=[{"text": 5}], field="text")
@example(rows=[[1, 2]], field="text")
def test_any_jsonl_rows(rows, field):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "rows.jsonl"
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
        _read(path, "jsonl", field)


parquet_columns = st.sampled_from(
    [
        pa.string(),
        pa.large_string(),
        pa.binary(),
        pa.int64(),
        pa.float64(),
        pa.bool_(),
        pa.list_(pa.string()),
        pa.struct([("text", pa.string())]),
    ]
)


@FUZZ
@given(
    column=st.sampled_from(["text", "body"]),
    kind=parquet_columns,
    texts=st.lists(st.text(max_size=20) | st.none(), max_size=6),
    field=st.sampled_from(["text", "body"]),
)
def test_any_parquet_table(column, kind, texts, field):
    """Real Parquet files with the text column of any type (strings, bytes, numbers, lists, structs)."""
    convert = {
        "string": lambda t: t,
        "large_string": lambda t: t,
        "binary": lambda t: None if t is None else t.encode("utf-8", "surrogatepass"),
        "int64": lambda t: None if t is None else len(t),
        "double": lambda t: None if t is None else float(len(t)),
        "bool": lambda t: None if t is None else bool(t),
    }
    name = str(kind)
    if name in convert:
        cells = [convert[name](t) for t in texts]
    elif name.startswith("list"):
        cells = [None if t is None else [t] for t in texts]
    else:
        cells = [None if t is None else {"text": t} for t in texts]
    try:
        table = pa.table({column: pa.array(cells, type=kind)})
    except (pa.ArrowInvalid, pa.ArrowTypeError, UnicodeEncodeError):
        return  # a value Arrow itself cannot store (e.g. a lone surrogate in a string column)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "table.parquet"
        pq.write_table(table, path)
        _read(path, "parquet", field)
        _read(path, "auto", field)
