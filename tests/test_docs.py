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


def test_readme_documents_the_geoclip_prior_with_only_recorded_figures():
    """The prior's section quotes change rates that benchmarks/results/prior.json holds, and claims no accuracy."""
    import json

    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    start = readme.index("### The GeoCLIP prior (`--prior geoclip`)")
    section = readme[start:readme.index("\n### ", start + 1)]
    assert "--prior geoclip" in section and "inject" in section and "rerank" in section
    assert "not whether it helps" in section
    recorded = json.loads((ROOT / "benchmarks" / "results" / "prior.json").read_text())["results"]["changes"]
    by_k = {row[0]: row for row in recorded}  # k, inject, rerank w=0.1, rerank w=0.5
    for k, inject, rerank in ((1, "62 %", "100 %"), (4, "45 %", "100 %"), (16, "3 %", "98 %")):
        assert by_k[k][1] == inject.replace(" ", "") and by_k[k][3] == rerank.replace(" ", "")
        assert inject in section and rerank in section
