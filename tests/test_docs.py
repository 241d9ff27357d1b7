"""What the README and the messages tell a new user to run must work from a fresh checkout."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# `pip install geoindex`, `pip install geoindex[serve]`, `pip install 'geoindex[ray]'`: an unrelated PyPI package.
_FROM_PYPI = re.compile(r"pip install\s+['\"]?geoindex\b")


def _texts() -> dict[Path, str]:
    files = [ROOT / "README.md", *sorted((ROOT / "geoindex").rglob("*.py")), *sorted((ROOT / "pipelines").glob("*.py")),
             *sorted((ROOT / "benchmarks").glob("*.py"))]
    return {f: f.read_text(encoding="utf-8") for f in files}


def test_nothing_tells_users_to_install_geoindex_from_pypi():
    offenders = [f"{path.relative_to(ROOT)}:{text.count(chr(10), 0, m.start()) + 1}: {m.group()}"
                 for path, text in _texts().items() for m in _FROM_PYPI.finditer(text)]
    assert not offenders, "these would install an unrelated PyPI package; use pip install -e '.[EXTRA]':\n" + "\n".join(
        offenders)


def test_readme_installs_from_the_checkout_and_says_the_name_is_not_on_pypi():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert "pip install -e '.[serve]'" in readme
    assert "not on PyPI" in readme
