"""The documentation site builds in strict mode, and its API page carries the docstrings."""

import html
import importlib
import inspect
import re
import subprocess
import sys
from pathlib import Path

import pytest

from lightning_nipq import FlatnessNoise, HardQuantize, LSQCallback, NIPQCallback, RobustQuantization

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    site_dir = tmp_path_factory.mktemp("site")
    # --strict turns every warning into a failure: broken links and anchors, pages missing
    # from the nav, and docstrings mkdocstrings cannot parse or whose arguments do not
    # match the signature.
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file", str(ROOT / "mkdocs.yml"), "--site-dir", str(site_dir)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, f"mkdocs build --strict failed:\n{result.stdout}\n{result.stderr}"
    return site_dir


def page_text(path: Path) -> str:
    """The visible text of an HTML page with all whitespace removed (tags split words unevenly)."""
    text = re.sub(r"<[^>]+>", " ", path.read_text(encoding="utf-8"))
    return "".join(html.unescape(text).split())


def documented_args(cls: type) -> dict[str, str]:
    """The ``Args:`` section of a Google-style class docstring: name -> description."""
    doc = inspect.cleandoc(cls.__doc__)
    section = doc.split("Args:\n", 1)[1]
    args: dict[str, str] = {}
    for line in section.splitlines():
        if not line.strip():
            break  # the section ends at the first blank line
        match = re.match(r"    (\w+): (.*)", line)
        if match:
            name, text = match.groups()
            args[name] = text
        else:
            args[name] += " " + line.strip()
    return args


@pytest.mark.parametrize("cls", [NIPQCallback, LSQCallback, HardQuantize, RobustQuantization, FlatnessNoise])
def test_api_page_documents_every_callback_argument(site, cls):
    text = page_text(site / "api.html")
    args = documented_args(cls)
    assert set(args) == set(inspect.signature(cls).parameters), f"{cls.__name__}'s Args section and signature differ"
    for name, description in args.items():
        # Rendered as "name (type, default: value) – description", ``code`` as <code>.
        words = "".join(description.replace("``", "").replace("`", "").split())
        entry = re.escape(name) + r"\([^–]*\)–" + re.escape(words)
        assert re.search(entry, text), f"{cls.__name__}.{name}: its entry or description is missing from the API page"


SUBPACKAGES = ["quant", "layers", "training", "convert", "saving", "robust", "data", "callbacks"]


@pytest.mark.parametrize("package", ["lightning_nipq"] + [f"lightning_nipq.{name}" for name in SUBPACKAGES])
def test_api_page_has_a_section_for_every_public_name(site, package):
    page = (site / "api.html").read_text(encoding="utf-8")
    module = importlib.import_module(package)
    missing = []
    for name in module.__all__:
        obj = getattr(module, name)
        # Documented once: under the front door if it is there, else under its subpackage.
        anchors = {f"lightning_nipq.{name}", f"{package}.{name}"}
        if hasattr(obj, "__qualname__"):
            anchors.add(f"{obj.__module__}.{obj.__qualname__}")
        if not any(f'id="{anchor}"' in page for anchor in anchors):
            missing.append(name)
    assert not missing, f"docs/api.md lacks a ::: block for {missing} of {package}"


def test_every_page_of_the_nav_is_built(site):
    for page in ("index", "user-guide", "cli", "saving-and-export", "design", "api"):
        assert (site / f"{page}.html").exists(), page
    # Cross-references from the pages to the API reference resolve to its sections.
    assert 'href="api.html#lightning_nipq.NIPQCallback"' in (site / "index.html").read_text(encoding="utf-8")
