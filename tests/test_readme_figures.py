"""Every measured figure in the README is the figure in its result file (benchmarks/results/), as listed in
tests/readme_figures.toml; a figure that drifts from its file, or a new one listed nowhere, fails."""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
SPEC = tomllib.loads((Path(__file__).with_name("readme_figures.toml")).read_text())
# What reads as a measurement: a decimal (not a version such as 2.13.0), a percentage or a ratio such as 1.5x.
MEASUREMENT = re.compile(r"(?<![\w./=+-])[+]?\d+(?:\.\d+)*(?:%|x\b)?")


def _prose(text: str) -> str:
    """README text without fenced code blocks, every run of whitespace one space (quotes may span lines)."""
    return " ".join(re.sub(r"^```.*?^```", " ", text, flags=re.S | re.M).split())


README = _prose((ROOT / "README.md").read_text())


def _select(doc, path: str):
    """`results[engine=ferry (eager),batch=1].tokens_per_s`: fields by name, a list row by `key=value` filters."""
    for part in re.findall(r"[^.\[]+(?:\[[^\]]*\])?", path):
        name, _, filters = part.partition("[")
        doc = doc[name]
        if filters:
            wanted = dict(f.split("=", 1) for f in re.split(r",(?=\w+=)", filters.rstrip("]")))
            rows = [r for r in doc if all(str(r.get(k)) == v for k, v in wanted.items())]
            assert len(rows) == 1, f"{path}: {len(rows)} rows match {wanted}"
            doc = rows[0]
    return doc


def _value(file: Path, spec: str) -> float:
    """A JSON field (`a / b` divides two), or for a text file `re:PATTERN`, its first group's first match."""
    text = file.read_text()
    if spec.startswith("re:"):
        match = re.search(spec[3:], text)
        assert match, f"{file.name}: no match for {spec[3:]!r}"
        return float(match.group(1))
    doc = json.loads(text)
    parts = [float(_select(doc, p.strip())) for p in spec.split(" / ")]
    return parts[0] / parts[1] if len(parts) == 2 else parts[0]


def _figures(entry: dict) -> tuple[str, list[str]]:
    return " ".join(entry["quote"].replace("{", "").replace("}", "").split()), re.findall(r"\{([^}]*)\}", entry["quote"])


@pytest.mark.parametrize("entry", SPEC["figure"], ids=lambda e: _figures(e)[0][:60])
def test_readme_figure_is_the_figure_in_its_result_file(entry):
    quote, figures = _figures(entry)
    assert quote in README, f"README no longer says: {quote!r}"
    file = RESULTS / entry["file"]
    assert file.is_file(), f"no result file {file.name}"
    assert Path(entry["file"]).stem in README, f"README does not name {file.name}, where its figures come from"
    assert len(figures) == len(entry["values"]), quote
    for figure, spec in zip(figures, entry["values"], strict=True):
        number = figure.lstrip("+").rstrip("%x")
        decimals = len(number.partition(".")[2])
        value = _value(file, spec) * (100 if figure.endswith("%") else 1)
        # Either rounding rule (half up or half even) of the file's value may print the README's figure.
        assert abs(value - float(number)) <= 0.5 * 10**-decimals + 1e-9, (
            f"README says {figure} in {quote!r}; {file.name} has {spec} = {value:g}")


def test_every_measurement_in_the_readme_is_listed_with_its_file():
    covered = [False] * len(README)
    for entry in SPEC["figure"]:
        quote, _ = _figures(entry)
        start = README.find(quote)
        plain = 0  # position in the quote without braces
        for piece in re.split(r"(\{[^}]*\})", " ".join(entry["quote"].split())):
            if piece.startswith("{") and start >= 0:
                covered[start + plain : start + plain + len(piece) - 2] = [True] * (len(piece) - 2)
            plain += len(piece) - 2 if piece.startswith("{") else len(piece)
    for entry in SPEC["not_a_measurement"]:
        for match in re.finditer(re.escape(entry["quote"]), README):
            covered[match.start() : match.end()] = [True] * (match.end() - match.start())
    unlisted = []
    for match in MEASUREMENT.finditer(README):
        token = match.group()
        is_measurement = token.count(".") == 1 or token.endswith(("%", "x"))
        if is_measurement and token.count(".") <= 1 and not all(covered[match.start() : match.end()]):
            unlisted.append(f"{token!r} in ...{README[max(0, match.start() - 50) : match.end() + 30]}...")
    assert not unlisted, "README figures listed nowhere in tests/readme_figures.toml:\n" + "\n".join(unlisted)
