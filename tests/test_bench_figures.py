"""Every benchmark figure README and bench/README quote is in the committed JSON they cite.

A section (the text under one heading, tables included) that names JSONs under bench/results/ quotes those
files: each decimal figure in it (`1.62`, `0.18 s`, `7.7x`) outside code spans must be some number of one of
them, rounded to the figure's own decimals. In bench/README,
every section that quotes a figure must cite its JSON. A figure typed by hand, copied from an older run or from
another machine fails here with its text.
"""

import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", ROOT / "bench" / "README.md"]
CITATION = re.compile(r"(?:bench/)?results/([\w.-]+\.json)")
# A decimal figure, in scientific notation too (9.2e-5); version numbers (2.13.0) and code spans are not results.
FIGURE = re.compile(r"(?<![\w.])(\d+\.\d+(?:e-?\d+)?)(?![\d.]*\d)")


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
    mantissa, _, exponent = figure.partition("e")
    decimals = len(mantissa.split(".")[1])
    # accuracies and fractions are stored as fractions and written as percentages
    candidates = [scaled for number in numbers for scaled in (number, 100 * number)]
    if exponent:
        return any(float(f"{number:.{decimals}e}") == float(figure) for number in candidates)
    return any(f"{number:.{decimals}f}" == figure for number in candidates)


def sections() -> list[tuple[Path, str, list[str], str]]:
    """(doc, section title, the JSON file names it cites, its text without code) for every section of DOCS."""
    found = []
    for doc in DOCS:
        for section in re.split(r"\n(?=#+ )", doc.read_text()):
            text = re.sub(r"`[^`]*`", "", re.sub(r"```.*?```", "", section, flags=re.S))
            found.append((doc, section.splitlines()[0].lstrip("# "), sorted(set(CITATION.findall(section))), text))
    return found


def cited_sections() -> list[tuple[str, list[str], str]]:
    """(where, cited JSON names, text) for each section that cites a JSON."""
    return [(f"{doc.relative_to(ROOT).as_posix()}: {title}", names, text)
            for doc, title, names, text in sections() if names]


def figures(text: str) -> list[str]:
    return FIGURE.findall(text)


def test_figures_are_found_as_the_docs_write_them() -> None:
    assert figures("7.7-10.9x at 256 tokens, vLLM 0.32 (2.13.0), 0.18 s, 9.2e-5") == ["7.7", "10.9", "0.32", "0.18",
                                                                                      "9.2e-5"]
    assert quoted("1.62", [1.6249]) and not quoted("1.62", [1.6261]) and quoted("12.0", [12.04])
    assert quoted("61.3", [0.6133]) and not quoted("61.3", [0.6124])
    assert quoted("9.2e-5", [9.1777e-05]) and not quoted("9.2e-5", [9.26e-05]) and not quoted("9.2e-5", [9.2e-4])
    assert "0.5" not in figures(re.sub(r"`[^`]*`", "", "with `--set x=0.5` at 1.5"))


@pytest.mark.parametrize("where,names,text", cited_sections(), ids=[where for where, _, _ in cited_sections()])
def test_each_quoted_figure_is_in_a_cited_json(where, names, text) -> None:
    numbers = []
    for name in names:
        path = ROOT / "bench" / "results" / name
        assert path.is_file(), f"{where} cites {name}, which is not in bench/results"
        numbers += numbers_in(json.loads(path.read_text()))
    missing = [figure for figure in figures(text) if not quoted(figure, numbers)]
    assert not missing, f"{where} quotes {missing}, which none of {', '.join(names)} holds"


def test_every_bench_readme_section_with_figures_cites_its_json() -> None:
    uncited = [title for doc, title, names, text in sections()
               if doc.parent.name == "bench" and not names and figures(text)]
    assert not uncited, f"bench/README.md sections quote figures but cite no JSON in bench/results: {uncited}"
