"""Progress in logs: plain lines with counts when stderr is not a terminal."""

from __future__ import annotations

from pipeline.progress import LogLines


def test_log_lines_report_counts(capsys):
    bar = LogLines("dump", 100, every=0.0)
    bar.advance(40, note="1,000 tok/s")
    bar.advance(60)
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("dump: 40/100 after") and err[0].endswith("1,000 tok/s")
    assert err[1].startswith("dump: 100/100")


def test_log_lines_are_rate_limited(capsys):
    bar = LogLines("dump", None, every=3600.0)
    for _ in range(50):
        bar.advance(1)
    assert capsys.readouterr().err == ""
    bar.line()
    assert capsys.readouterr().err.startswith("dump: 50 after")
