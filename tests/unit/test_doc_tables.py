"""The tables of measured figures in README.md and docs/ are the ones benchmarks/tables.py renders
from the benchmarks' JSON files, and no table of figures in the measured pages is copied by hand."""

import importlib.util
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
# Loaded from its file: the name `tables` would otherwise be PyTables' if that is installed.
_spec = importlib.util.spec_from_file_location("deltatune_doc_tables", ROOT / "benchmarks" / "tables.py")
tables = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(tables)

MEASURED_PAGES = ["docs/measured.md", "docs/quantization.md"]
# Tables of figures that are not generated yet: (page, header line) -> why.
UNMARKED: dict[tuple[str, str], str] = {}


def _marked() -> list[tuple[str, str, str]]:
    """(page, JSON path, table text) of every marked table in README.md and docs/*.md."""
    return [(str(page.relative_to(ROOT)), source, table)
            for page in tables.pages() for source, table, _ in tables.marked_tables(page.read_text())]


MARKED = _marked()


@pytest.mark.parametrize(("page", "source", "table"), MARKED, ids=[f"{p}:{s}" for p, s, _ in MARKED])
def test_marked_table_is_what_its_json_renders(page, source, table):
    assert table == tables.render(source), f"run: python benchmarks/tables.py (rewrites {page} from {source})"


def test_the_benchmark_tables_are_marked():
    sources = {source for _, source, _ in MARKED}
    assert {"benchmarks/results-h100.json", "benchmarks/compare-cpu.json", "benchmarks/load-memory-cpu.json",
            "benchmarks/merge-error-cpu.json", "benchmarks/default-job-cpu.json", "benchmarks/default-job-speed-cpu.json",
            "benchmarks/lr-choice-cpu.json", "benchmarks/parity-cpu.json", "benchmarks/bench-cpu.json",
            "benchmarks/bench-cpu-all-labels.json", "benchmarks/bench-cpu-4bit.json",
            "benchmarks/bench-cpu-4bit.json#memory", "benchmarks/dequant-speed-cpu.json",
            "benchmarks/default-job-speed-nf4-cpu.json", "benchmarks/quality-cpu.json",
            "benchmarks/quality-cpu.json#ratios", "benchmarks/sweep-defaults-cpu.json",
            "benchmarks/peak-memory-cpu.json"} <= sources


def _change_one_number(table: str) -> str:
    """``table`` with the first digit of its first data row changed."""
    head, rule, row, rest = table.split("\n", 3)
    digit = re.search(r"\d", row)
    changed = str((int(digit.group()) + 1) % 10)
    return "\n".join([head, rule, row[:digit.start()] + changed + row[digit.end():], rest])


@pytest.mark.parametrize(("page", "source", "table"), MARKED, ids=[f"{p}:{s}" for p, s, _ in MARKED])
def test_a_changed_cell_is_a_mismatch(page, source, table):
    text = (ROOT / page).read_text()
    altered = text.replace(table, _change_one_number(table), 1)
    assert altered != text
    assert source in tables.stale_tables(altered)
    assert tables.stale_tables(tables.rewrite(altered)) == []


def test_check_exits_1_listing_the_table_and_rewriting_fixes_it(tmp_path, monkeypatch, capsys):
    page = tmp_path / "page.md"
    table = tables.render("benchmarks/merge-error-cpu.json")
    good = f"Text.\n\n<!-- table: benchmarks/merge-error-cpu.json -->\n{table}<!-- end table -->\n\nMore text.\n"
    page.write_text(good.replace(table, _change_one_number(table)))
    monkeypatch.setattr(tables, "pages", lambda: [page])
    assert tables.main(["--check"]) == 1
    assert "page.md: benchmarks/merge-error-cpu.json" in capsys.readouterr().out
    assert tables.main([]) == 0
    assert page.read_text() == good
    assert tables.main(["--check"]) == 0


def test_a_table_without_its_end_marker_is_an_error():
    with pytest.raises(ValueError, match="end table"):
        tables.marked_tables("<!-- table: benchmarks/compare-cpu.json -->\n| a |\n|---|\n")


def _tables_of(text: str) -> list[tuple[str, list[str]]]:
    """(line before the table, table lines) of every Markdown table in ``text``, code blocks skipped."""
    text = re.sub(r"```.*?```", "", text, flags=re.S)
    found = []
    spans = [where for _, _, where in tables.marked_tables(text)]
    for match in re.finditer(r"((?:^\|.*\n)+)", text, re.M):
        before = text[:match.start()].rstrip("\n").rsplit("\n", 1)[-1]
        if any(span.start <= match.start() < span.stop for span in spans):
            before = "<!-- table: inside-a-marked-block -->"  # one JSON may render several tables
        found.append((before, match.group(1).splitlines()))
    return found


@pytest.mark.parametrize("page", MEASURED_PAGES)
def test_every_table_of_figures_is_marked(page):
    unmarked = []
    for before, lines in _tables_of((ROOT / page).read_text()):
        has_numbers = any(re.search(r"\d", line) for line in lines[2:])
        if has_numbers and not tables.START.fullmatch(before) and (page, lines[0]) not in UNMARKED:
            unmarked.append(lines[0])
    assert unmarked == [], "mark these tables and render them from a JSON (benchmarks/tables.py)"


def test_every_listed_exception_is_still_an_unmarked_table():
    for page, header in UNMARKED:
        befores = [before for before, lines in _tables_of((ROOT / page).read_text()) if lines[0] == header]
        assert befores and not any(tables.START.fullmatch(b) for b in befores), (
            f"{page}: {header} is marked or gone now: remove it from UNMARKED")
