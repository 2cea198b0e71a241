"""Every benchmark figure README and bench/README quote is in the committed JSON they cite.

A paragraph (or table) that names a JSON under bench/results/ quotes that file: each decimal figure in it
(`1.62`, `0.18 s`, `7.7x`) must be some number of the JSON rounded to the figure's own decimals. A figure typed
by hand, copied from an older run or from another machine fails here with its text.
"""

import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", ROOT / "bench" / "README.md"]
CITATION = re.compile(r"(?:bench/)?results/([\w.-]+\.json)")
# A decimal figure; version numbers (2.13.0, 0.32) and figures inside code spans are not results.
FIGURE = re.compile(r"(?<![\w.])(\d+\.\d+)(?![\d.]*\d)")


def numbers_in(data) -> list[float]:
    if isinstance(data, bool):
        return []
    if isinstance(data, (int, float)):
        return [float(data)]
    if isinstance(data, dict):
        return [n for value in data.values() for n in numbers_in(value)]
    if isinstance(data, list):
        return [n for value in data for n in numbers_in(value)]
    return []


def quoted(figure: str, numbers: list[float]) -> bool:
    decimals = len(figure.split(".")[1])
    return any(f"{number:.{decimals}f}" == figure for number in numbers)


def cited_paragraphs() -> list[tuple[str, str, str]]:
    """(doc name, JSON file name, paragraph text without code spans) for each paragraph that cites a JSON."""
    found = []
    for doc in DOCS:
        for paragraph in re.split(r"\n\s*\n", doc.read_text()):
            for name in sorted(set(CITATION.findall(paragraph))):
                found.append((doc.relative_to(ROOT).as_posix(), name, re.sub(r"`[^`]*`", "", paragraph)))
    return found


def figures(text: str) -> list[str]:
    return FIGURE.findall(text)


def test_figures_are_found_as_the_docs_write_them() -> None:
    assert figures("7.7-10.9x at 256 tokens, vLLM 0.32 (2.13.0), 0.18 s") == ["7.7", "10.9", "0.32", "0.18"]
    assert quoted("1.62", [1.6249]) and not quoted("1.62", [1.6261]) and quoted("12.0", [12.04])
    assert "0.5" not in figures(re.sub(r"`[^`]*`", "", "with `--set x=0.5` at 1.5"))


@pytest.mark.parametrize("doc,name,paragraph", cited_paragraphs(),
                         ids=[f"{d}:{n}:{i}" for i, (d, n, _) in enumerate(cited_paragraphs())])
def test_each_quoted_figure_is_in_the_cited_json(doc, name, paragraph) -> None:
    path = ROOT / "bench" / "results" / name
    assert path.is_file(), f"{doc} cites {name}, which is not in bench/results"
    numbers = numbers_in(json.loads(path.read_text()))
    missing = [figure for figure in figures(paragraph) if not quoted(figure, numbers)]
    assert not missing, f"{doc} quotes {missing} beside {name}, which holds no such number"
