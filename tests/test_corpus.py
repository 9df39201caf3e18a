"""Corpus readers, the document split and packing."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pipeline.config import CorpusConfig
from pipeline.data.corpus import (
    Document,
    describe_corpus,
    is_heldout,
    iter_documents,
    iter_packed,
    sample_sequences,
    split_documents,
)
from pipeline.errors import LprError
from pipeline.testing.tiny_data import build_tiny_tokenizer, make_texts

TEXTS = make_texts(6, words_per_doc=20, seed=3)


def load(source, **kw) -> list[Document]:
    return [doc for _, doc in iter_documents(CorpusConfig(source=str(source), **kw))]


def test_text_file_and_folder(tmp_path):
    (tmp_path / "a.txt").write_text(TEXTS[0])
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.md").write_text(TEXTS[1])
    (tmp_path / "skip.bin").write_bytes(b"\x00\x01")
    assert [d.text for d in load(tmp_path / "a.txt")] == [TEXTS[0]]
    assert [d.text for d in load(tmp_path)] == [TEXTS[0], TEXTS[1]]


def test_moving_the_corpus_keeps_names_split_and_digest(tmp_path):
    """Where the corpus lives (another mount, machine or bucket) must not move documents between the
    train and held-out sides: names are relative to the source."""
    rows = "".join(json.dumps({"text": t}) + "\n" for t in make_texts(40))
    for place in ("here", "there/deeper"):
        (tmp_path / place / "docs").mkdir(parents=True)
        (tmp_path / place / "c.jsonl").write_text(rows)
        for i, text in enumerate(TEXTS):
            (tmp_path / place / "docs" / f"{i}.txt").write_text(text)
    for source in ("c.jsonl", "docs"):
        here, there = load(tmp_path / "here" / source), load(tmp_path / "there/deeper" / source)
        assert [d.name for d in here] == [d.name for d in there]
        assert all(str(tmp_path) not in d.name for d in here)
        described = [describe_corpus(CorpusConfig(source=str(tmp_path / p / source))) for p in ("here", "there/deeper")]
        assert described[0].digest == described[1].digest
        assert described[0].heldout_documents == described[1].heldout_documents


def test_jsonl_parquet_and_datasets_agree(tmp_path):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"body": t, "n": i} for i, t in enumerate(TEXTS)]
    (tmp_path / "c.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "c.parquet")
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "ds"))
    for source in ("c.jsonl", "c.parquet", "ds"):
        assert [d.text for d in load(tmp_path / source, text_field="body")] == TEXTS, source


@pytest.mark.parametrize(
    ("name", "content", "kw", "needle"),
    [
        ("bad.txt", b"caf\xe9 latin-1", {}, "is not UTF-8"),
        ("rows.jsonl", b'{"body": "x"}\n', {}, "has no field 'text'"),
        ("rows.jsonl", b'{"text": 1}\n', {}, "is not a string"),
        ("rows.jsonl", b"{not json}\n", {}, "is not valid JSON"),
        ("empty.jsonl", b"\n\n", {}, "has no text"),
    ],
)
def test_bad_corpora(tmp_path, name, content, kw, needle):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(LprError, match=needle):
        describe_corpus(CorpusConfig(source=str(tmp_path / name), **kw))  # the check a stage makes first


def test_describe_counts_and_hashes(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in make_texts(50)))
    summary = describe_corpus(CorpusConfig(source=str(path)))
    assert summary.documents == 50 == summary.train_documents + summary.heldout_documents
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in make_texts(50, seed=9)))
    assert describe_corpus(CorpusConfig(source=str(path))).digest != summary.digest
    with pytest.raises(LprError, match="no training documents"):
        describe_corpus(CorpusConfig(source=str(path), heldout_fraction=0.999999))


def test_missing_corpus_and_parquet_column(tmp_path):
    with pytest.raises(LprError, match="does not exist"):
        load(tmp_path / "nope.txt")
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist([{"body": "x"}]), tmp_path / "c.parquet")
    with pytest.raises(LprError, match="has no column 'text'"):
        load(tmp_path / "c.parquet")


def test_split_is_by_document_and_stable():
    docs = [Document(name=f"doc{i}", text="x") for i in range(2000)]
    train = list(split_documents(enumerate(docs), split="train", heldout_fraction=0.1))
    held = list(split_documents(enumerate(docs), split="heldout", heldout_fraction=0.1))
    assert {i for i, _ in train}.isdisjoint({i for i, _ in held})
    assert len(train) + len(held) == len(docs)
    assert 150 < len(held) < 250
    assert all(is_heldout(d.name, 0.1) for _, d in held)


def test_packing_keeps_every_token_in_order():
    tok = build_tiny_tokenizer(TEXTS)
    docs = list(enumerate(Document(name=str(i), text=t) for i, t in enumerate(TEXTS)))
    seqs = list(iter_packed(docs, tokenizer=tok, seq_len=16, max_tokens=None))
    stream = np.concatenate([s.ids for s in seqs])
    expected = np.concatenate([tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for t in TEXTS])
    np.testing.assert_array_equal(stream, expected)
    assert all(len(s.ids) == 16 for s in seqs[:-1]) and 0 < len(seqs[-1].ids) <= 16
    doc_ids = np.concatenate([s.doc_ids for s in seqs])
    assert (np.diff(doc_ids) >= 0).all() and set(doc_ids.tolist()) == set(range(len(TEXTS)))
    limited = list(iter_packed(docs, tokenizer=tok, seq_len=16, max_tokens=37))
    assert sum(len(s.ids) for s in limited) == 37
    np.testing.assert_array_equal(np.concatenate([s.ids for s in limited]), expected[:37])


def test_demo_corpus_is_deterministic_and_mixed():
    from pipeline.demo.corpus import demo_documents

    a = demo_documents(max_chars=300_000)
    b = demo_documents(max_chars=300_000)
    assert [d.name for d in a] == [d.name for d in b]
    kinds = {d.name.split(":")[0] for d in a}
    assert kinds == {"topic", "doc", "code"}
    assert sum(len(d.text) for d in a) <= 300_000
    big = {d.name for d in demo_documents(max_chars=2_000_000)}
    held = [d for d in big if is_heldout(d, 0.1)]
    assert len(held) >= 50


def test_sampled_draws_are_disjoint_and_the_first_ignores_the_later_counts(tmp_path):
    """The calibration sequences are drawn first: a larger training budget after them must not change
    them (otherwise the bias baseline would move with distill.model_steps)."""
    texts = make_texts(40, words_per_doc=30, seed=5)
    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    cfg = CorpusConfig(source=str(tmp_path / "c.jsonl"), seq_len=16, heldout_fraction=0.1)
    tokenizer = build_tiny_tokenizer(texts)
    docs = split_documents(iter_documents(cfg), split="train", heldout_fraction=0.1)
    full = sum(len(s.ids) == 16 for s in iter_packed(docs, tokenizer=tokenizer, seq_len=16, max_tokens=None))
    assert 240 <= full <= 4 * 70  # the pool is the whole train side for both budgets below
    small = sample_sequences(cfg, tokenizer, counts=(40, 30), minimum=70, seed=7)
    large = sample_sequences(cfg, tokenizer, counts=(40, 200), minimum=70, seed=7)
    np.testing.assert_array_equal(small[0], large[0])
    assert [len(d) for d in small] == [40, 30] and [len(d) for d in large] == [40, 200]
    for draws in (small, large):
        rows = {tuple(r) for d in draws for r in d}
        assert len(rows) == sum(len(d) for d in draws)  # no sequence in two draws (nor twice in one)
    assert sample_sequences(cfg, tokenizer, counts=(40, 0), minimum=40, seed=7)[1].shape == (0, 16)
    with pytest.raises(LprError, match="at least 100000 are needed"):
        sample_sequences(cfg, tokenizer, counts=(40, 30), minimum=100_000, seed=7)


def test_a_folder_reads_text_files_whatever_their_name(tmp_path):
    """Licence texts without an extension, source code, a nested folder: every text file is a document,
    every row of a JSONL file too; binary files and hidden folders are skipped."""
    (tmp_path / "GPL-3").write_text(TEXTS[0])
    (tmp_path / "Apache-2.0").write_text(TEXTS[1])
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "tool.py").write_text("def main():\n    return 1\n")
    (tmp_path / "src" / "lib.rs").write_text("fn main() {}\n")
    (tmp_path / "logo.png").write_bytes(b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR")
    (tmp_path / "blob").write_bytes(bytes(range(256)))
    (tmp_path / ".git").mkdir()
    (tmp_path / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    (tmp_path / "rows.jsonl").write_text(json.dumps({"text": "a row"}) + "\n")
    names = [doc.name for doc in load(tmp_path)]
    assert names == ["Apache-2.0", "GPL-3", "rows.jsonl:1", "src/lib.rs", "src/tool.py"]
    assert [doc.name for doc in load(tmp_path, include=["GPL-3", "src/tool.py"])] == ["GPL-3", "src/tool.py"]
    assert [doc.name for doc in load(tmp_path, suffixes=[".py"])] == ["src/tool.py"]
    assert [doc.name for doc in load(tmp_path, suffixes=[""])] == ["GPL-3"]  # "Apache-2.0" ends in ".0"


def test_a_folder_with_no_text_names_what_it_skipped_and_the_setting(tmp_path):
    (tmp_path / "a.png").write_bytes(b"\x89PNG\0\0")
    (tmp_path / "b.png").write_bytes(b"\x89PNG\0\1")
    (tmp_path / "notes.c").write_text("int x;\n")
    with pytest.raises(
        LprError, match=r"has no text: 3 files seen, skipped: 3 not in corpus.suffixes \(.png ×2, .c ×1\)"
    ):
        describe_corpus(CorpusConfig(source=str(tmp_path), suffixes=[".py"]))
    (tmp_path / "notes.c").unlink()
    with pytest.raises(LprError, match=r"2 files seen, skipped: 2 not text \(.png ×2\).*corpus.suffixes"):
        describe_corpus(CorpusConfig(source=str(tmp_path)))
    with pytest.raises(ValueError, match="not file extensions"):
        CorpusConfig(source=str(tmp_path), suffixes=["py"])


def test_a_text_named_file_that_is_not_utf8_is_an_error_in_a_folder(tmp_path):
    (tmp_path / "ok").write_text(TEXTS[0])
    (tmp_path / "bad.py").write_bytes("caf\xe9 = 1".encode("latin-1"))
    with pytest.raises(LprError, match=r"bad\.py is not UTF-8"):
        load(tmp_path)


def test_one_kind_of_the_demo_corpus_keeps_its_names_and_split():
    doc = load("demo:doc", demo_max_chars=200_000)
    everything = load("demo", demo_max_chars=200_000)
    assert doc and all(d.name.startswith("doc:") for d in doc)
    assert doc == [d for d in everything if d.name.startswith("doc:")]
    with pytest.raises(LprError, match="no documents of kind 'prose'"):
        load("demo:prose")
