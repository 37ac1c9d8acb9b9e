"""The README and the guide in docs/ are true and whole:

- the site builds with `mkdocs build --strict` (a broken link, a missing page or a bad anchor fails), without
  importing TensorFlow, Keras or Horovod (the API reference is read from the source);
- the generated parts are current (every config key in the reference; the Keras diff is the real one between the two
  example files, with the counts it states); the layout page names every module and package;
- every page of the site's nav is in the README's and the home page's table of pages, and the README's links resolve;
- every number the README and the guide quote comes from a source: a marker right after it,
  `<!-- src: docs/bench/FILE.json KEY -->` (the JSON value at KEY, rounded as shown) or `<!-- src: tests/... -->`
  (a value the test asserts, written in that file); numbers that read as measurements (ratios, percentages, rates,
  times in ms, accuracies and shares, tolerances) without a marker fail. A dated study kept with its own data
  (`<!-- record: DATA-PATH what -->` ... `<!-- /record -->`, e.g. the sweep study) is a record, as
  docs/benchmarks-multinode.md is: its data must exist, its numbers are not matched one by one.
"""
import importlib.util
import json
import math
import os
import re
import subprocess
import sys

import pytest
import yaml

from conftest import REPO
from hvdtrain.config import describe_fields

DOCS = REPO / "docs"
README = REPO / "README.md"


def nav_pages() -> list[str]:
    """The pages of mkdocs.yml's nav, in order (paths relative to docs/)."""
    def walk(items):
        for item in items:
            value = next(iter(item.values())) if isinstance(item, dict) else item
            yield from walk(value) if isinstance(value, list) else [value]
    return list(walk(yaml.safe_load((REPO / "mkdocs.yml").read_text())["nav"]))


def update_docs():
    spec = importlib.util.spec_from_file_location("update_docs", REPO / "scripts/update_docs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ---------------------------------------------------------------------------------------------- the site builds

def test_the_site_builds_strictly_without_importing_tensorflow(tmp_path):
    poisoned = tmp_path / "poisoned"        # importing any of these during the build fails it
    for name in ("tensorflow", "keras", "horovod"):
        (poisoned / name).mkdir(parents=True)
        (poisoned / name / "__init__.py").write_text(f"raise ImportError('the docs build imported {name}')\n")
    env = dict(os.environ, PYTHONPATH=str(poisoned), NO_MKDOCS_2_WARNING="1")
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file", str(REPO / "mkdocs.yml"),
                           "--site-dir", str(tmp_path / "site")], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for page in nav_pages():   # every page is there, the API reference with the Keras API's functions in it
        assert (tmp_path / "site" / re.sub(r"(index)?\.md$", "", page) / "index.html").is_file(), page
    api = (tmp_path / "site/api/keras/index.html").read_text()
    for name in ("init", "distribute", "shard_files", "agreed_steps", "Run", "pipeline", "evaluate", "predict"):
        assert f'id="hvdtrain.keras.{name}"' in api, name


# ------------------------------------------------------------------------------------------- generated and whole

def test_the_generated_parts_are_current():
    assert update_docs().stale() == [], "run .venv/bin/python scripts/update_docs.py"


def test_the_keras_diff_is_the_real_one_with_its_counts():
    page = (DOCS / "keras-script.md").read_text()
    shown = page[page.index("```diff\n") + len("```diff\n"):page.index("```\n", page.index("```diff\n"))]
    assert shown.startswith("--- examples/keras_single_process.py\n+++ examples/keras_resumable.py\n")
    before = (REPO / "examples/keras_single_process.py").read_text().splitlines()
    after = (REPO / "examples/keras_resumable.py").read_text().splitlines()
    added = [line[1:] for line in shown.splitlines()[2:] if line.startswith("+")]
    removed = [line[1:] for line in shown.splitlines()[2:] if line.startswith("-")]
    assert all(line in after for line in added) and all(line in before for line in removed)
    assert f"{len(added)} lines added and {len(removed)} removed" in page


def test_the_configuration_reference_has_every_key():
    page = (DOCS / "configuration.md").read_text()
    missing = [key for key, _, _ in describe_fields() if f"| `{key}` |" not in page]
    assert not missing, f"docs/configuration.md lacks {missing}"


def test_the_layout_page_names_every_module_and_package():
    page = (DOCS / "layout.md").read_text()
    layout = page[page.index("```\n") + 4:page.rindex("```")]
    top = sorted(p.stem for p in (REPO / "hvdtrain").iterdir()
                 if (p.suffix == ".py" and p.stem != "__init__") or (p.is_dir() and (p / "__init__.py").is_file()))
    missing = [name for name in top if not re.search(rf"\b{re.escape(name)}(\.py|/)", layout)]
    assert not missing, f"docs/layout.md lacks {missing}"
    for folder in ("scripts", "slurm", "configs", "examples", "tests", "docs"):
        assert f"{folder}/" in layout


def test_every_page_is_in_both_tables_of_pages_and_the_readme_links_resolve():
    readme, home = README.read_text(), (DOCS / "index.md").read_text()
    for page in nav_pages():
        if page != "index.md":
            assert f"](docs/{page})" in readme, f"README's table of the guide lacks docs/{page}"
            assert f"]({page})" in home, f"docs/index.md's table lacks {page}"
    for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", readme):
        if "://" not in target:
            assert (REPO / target).exists(), f"README links to {target}, which does not exist"


def test_the_readme_is_a_front_door_with_the_two_commands_ci_runs():
    readme = README.read_text()
    assert len(readme.splitlines()) <= 300
    commands = re.findall(r"^make (\w+)$", (REPO / ".ci/run").read_text(), flags=re.M)
    assert commands == ["train", "test"]
    for command in commands:
        assert re.search(rf"^make {command} +# ", readme, flags=re.M), f"the README does not show `make {command}`"


# ------------------------------------------------------------------------------------------- numbers and sources

CHECKED = ["README.md", *(f"docs/{page}" for page in nav_pages() if page not in (
    "benchmarks.md",             # generated from docs/bench/*.json by hvdtrain bench report
    "benchmarks-multinode.md",   # a dated record of one run, with its machine and versions
    "architecture.md",           # no measurements; rewritten by the lead
))]
MARKER = re.compile(r"<!-- src: (\S+)(?: (.+?))? -->")
RECORD = re.compile(r"<!-- record: (\S+) (.+?) -->")   # a dated study kept with its data, not checked number by number
NUMBER = re.compile(r"(?<![\w.])(\d[\d,]*(?:\.\d+)?(?:e-\d+)?)(?=x\b|×|[^\w.]|\.(?!\d)|$)")
MEASUREMENT_AFTER = re.compile(r"(x\b|×| ?%| ?(samples|images)/s| ?GB/s| ?ms\b| ?us\b| ?CPU-s)")


def prose_lines(path: str):
    """(line number, text) of a page's prose: fenced code, inline code (also across a line break), link targets and
    comments other than source markers removed, so that only numbers a reader takes as claims are left."""
    kept, fenced = [], False
    for line in (REPO / path).read_text().splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
        kept.append("" if fenced or line.lstrip().startswith("```") else line)
    def blank(match):   # keep the line count
        return "\n" * match.group(0).count("\n")
    text = re.sub(r"<!-- record: .*?<!-- /record -->", blank, "\n".join(kept), flags=re.S)
    text = re.sub(r"``.+?``|`[^`]+`", blank, text, flags=re.S)
    text = re.sub(r"\]\([^)]*\)", "]", text)
    text = re.sub(r"<!--(?! src:).*?-->", blank, text, flags=re.S)
    yield from enumerate(text.splitlines(), 1)


def is_measurement(token: str, after: str) -> bool:
    return bool(MEASUREMENT_AFTER.match(after)) or "e-" in token or bool(re.fullmatch(r"0\.\d{2,}", token))


def claims(path: str):
    """Every (where, token, text after it up to the marker, marker or None) on a page."""
    for number, line in prose_lines(path):
        pos = 0
        for marker in [*MARKER.finditer(line), None]:
            end = marker.start() if marker else len(line)
            tokens = list(NUMBER.finditer(line, pos, end))
            for i, token in enumerate(tokens):
                owned = marker if i == len(tokens) - 1 else None    # a marker sources the number just before it
                yield f"{path}:{number}", token.group(1), line[token.end():end], owned
            pos = marker.end() if marker else end


def value_at(doc, key: str):
    """KEY: dotted names, [i] for a list index, [name=value,...] for the one list item with those fields."""
    for name, index in re.findall(r"([^.\[\]]+)|\[([^\]]*)\]", key):
        if name:
            doc = doc[name]
        elif index.isdigit():
            doc = doc[int(index)]
        else:
            wanted = dict(pair.split("=", 1) for pair in index.split(","))
            found = [item for item in doc if all(str(item.get(k)) == v for k, v in wanted.items())]
            assert len(found) == 1, f"[{index}] selects {len(found)} items"
            doc = found[0]
    return doc


def agrees(shown: str, value: float, percent: bool) -> bool:
    """The shown number is the value rounded to the digits shown (or the value as a percentage)."""
    mantissa, _, exponent = shown.replace(",", "").partition("e")
    decimals = len(mantissa.partition(".")[2])
    half_unit = 0.5 * 10 ** (int(exponent or 0) - decimals) * (1 + 1e-9)
    candidates = [value * 100, value] if percent else [value]
    return any(math.isclose(c, float(shown.replace(",", "")), abs_tol=half_unit) for c in candidates)


@pytest.mark.parametrize("path", CHECKED)
def test_every_number_quoted_comes_from_its_source(path):
    problems = []
    for where, token, after, marker in claims(path):
        if marker is None:
            if is_measurement(token, after):
                problems.append(f"{where}: {token}{after[:12]!r} has no source marker after it")
            continue
        source, key = marker.group(1), marker.group(2)
        if not (REPO / source).is_file():
            problems.append(f"{where}: {source} does not exist")
        elif source.endswith(".json"):
            try:
                value = value_at(json.loads((REPO / source).read_text()), key or "")
            except (KeyError, IndexError, TypeError, AssertionError) as e:
                problems.append(f"{where}: {source} has no {key} ({e})")
                continue
            if not agrees(token, float(value), "%" in after):
                problems.append(f"{where}: {token} shown, {source} {key} is {value}")
        elif not re.search(rf"(?<![\w.]){re.escape(token)}(?![\w]|\.\d)", (REPO / source).read_text()):
            problems.append(f"{where}: {token} is not in {source}")
    assert not problems, "\n".join(problems)


def test_every_record_names_its_data_and_is_closed():
    for path in CHECKED:
        text = (REPO / path).read_text()
        records = RECORD.findall(text)
        assert len(records) == text.count("<!-- /record -->"), path
        for data, _ in records:
            assert (REPO / data).exists(), f"{path}: the record's data {data} does not exist"


def test_the_checks_of_numbers_would_catch_a_wrong_or_unsourced_number(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("trains 1.26x<!-- src: docs/bench/train.json summary.mlp.hvdtrain_vs_horovod --> faster, "
                    "1.31x<!-- src: docs/bench/train.json summary.mlp.hvdtrain_vs_horovod --> and 2.5x alone; "
                    "`0.123` in code is not a claim; accuracy 0.95<!-- src: tests/parallel/test_images.py -->\n")
    found = [(token, marker is not None) for _, token, _, marker in claims(str(page))]   # REPO / absolute = absolute
    assert found == [("1.26", True), ("1.31", True), ("2.5", False), ("0.95", True)]
    assert agrees("1.26", 1.2626, False) and not agrees("1.31", 1.2626, False) and agrees("9", 0.089, True)
    assert agrees("2e-7", 2.4e-7, False) and not agrees("2e-7", 3.81e-6, False)
