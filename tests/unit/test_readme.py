"""What the README shows is true: the diff of "Your own Keras script" is the real one between the two example files,
with the count it states; the layout section names every top-level module and package; every config key is in the
reference."""
import difflib
import re

from conftest import REPO
from hvdtrain.config import describe_fields

README = (REPO / "README.md").read_text()


def block(begin: str, end: str = "```\n") -> str:
    start = README.index(begin) + len(begin)
    return README[start:README.index(end, start)]


def test_the_keras_script_diff_is_the_real_one():
    before, after = "examples/keras_single_process.py", "examples/keras_resumable.py"
    real = "".join(difflib.unified_diff((REPO / before).read_text().splitlines(keepends=True),
                                        (REPO / after).read_text().splitlines(keepends=True), before, after, n=1))
    shown = block("<!-- keras-diff: checked by tests/unit/test_readme.py -->\n```diff\n")
    assert shown == real, "regenerate the README's diff from the two example files"
    added = sum(1 for line in real.splitlines() if line.startswith("+") and not line.startswith("+++"))
    removed = sum(1 for line in real.splitlines() if line.startswith("-") and not line.startswith("---"))
    assert f"{added} lines added and {removed} removed" in README


def test_the_layout_section_names_every_module_and_package():
    layout = block("## Layout\n\n```\n")
    top = sorted(p.stem for p in (REPO / "hvdtrain").iterdir()
                 if (p.suffix == ".py" and p.stem != "__init__") or (p.is_dir() and (p / "__init__.py").is_file()))
    missing = [name for name in top if not re.search(rf"\b{re.escape(name)}(\.py|/)", layout)]
    assert not missing, f"the README's layout section lacks {missing}"
    for folder in ("scripts", "slurm", "configs", "examples", "tests", "docs"):
        assert f"{folder}/" in layout


def test_readme_documents_every_config_key():
    missing = [key for key, _, _ in describe_fields() if f"`{key}`" not in README]
    assert not missing, f"README config reference lacks {missing}"
