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


def test_every_transcript_in_the_readme_is_generated_by_the_committed_script():
    """A ```console block written by hand goes stale; each one sits inside a block that `make docs-examples` fills."""
    from pipelines.docs_examples import BLOCK, EXAMPLES, generated_blocks

    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    outside = BLOCK.sub("", readme)
    assert "```console" not in outside, "a ```console block outside <!-- generated: NAME --> markers"
    assert set(generated_blocks(readme)) == set(EXAMPLES)
    assert "docs-examples:" in (ROOT / "Makefile").read_text()


def test_replace_blocks_rewrites_only_the_named_blocks():
    from pipelines.docs_examples import replace_blocks

    text = ("a\n<!-- generated: x -->\n```console\nold x\n```\n<!-- end: x -->\nb\n"
            "<!-- generated: y -->\n```console\nold y\n```\n<!-- end: y -->\n")
    out = replace_blocks(text, {"x": "$ new\nline\n"})
    assert "```console\n$ new\nline\n```\n<!-- end: x -->" in out and "old y" in out and "old x" not in out
    import pytest

    from geoindex.errors import ConfigError
    with pytest.raises(ConfigError, match="no block marked"):
        replace_blocks(text, {"z": "..."})


def test_docs_examples_regenerates_the_transcripts_from_this_code(small_index, tmp_path):
    """The script runs the README's commands against an index and writes what they printed into the README."""
    from PIL import ExifTags, Image
    from PIL.TiffImagePlugin import IFDRational as R

    from pipelines import docs_examples

    photos = tmp_path / "photos"
    photos.mkdir()
    for i, src in enumerate(docs_examples.PHOTOS.values()):
        exif = Image.Exif()
        exif[ExifTags.IFD.GPSInfo] = {1: "N", 2: (R(50 + i, 1),), 3: "E", 4: (R(10 + i, 1),)}
        Image.new("RGB", (96, 64), (40 * i, 120, 200)).save(photos / src, "JPEG", exif=exif)
    readme = tmp_path / "README.md"
    readme.write_text((ROOT / "README.md").read_text(encoding="utf-8"), encoding="utf-8")
    code = docs_examples.main(["--readme", str(readme), "--index", str(small_index), "--photos", str(photos),
                               "--skip", "demo"])
    assert code == 0
    blocks = docs_examples.generated_blocks(readme.read_text(encoding="utf-8"))
    one = blocks["locate-one"]
    assert one.startswith("```console\n$ geoindex locate photos/berlin.jpg --index indexes/demo --top-n 3\n")
    assert "photos/berlin.jpg" in one and "50.00000,10.00000" in one and "1 of 1 images located" in one
    folder = blocks["locate-folder"]
    assert "error: photos/broken.jpg" in folder and "3 of 4 images located" in folder and "exit 1" in folder
    assert "within the region" in blocks["locate-bbox"]
    assert '"encoder":"tiny"' in blocks["serve"] and '"image":"berlin.jpg"' in blocks["serve"]
    assert str(tmp_path) not in readme.read_text(encoding="utf-8")
    assert blocks["demo"] == docs_examples.generated_blocks((ROOT / "README.md").read_text(encoding="utf-8"))["demo"]


def test_every_precision_option_says_the_same_thing_about_auto():
    """`--precision auto` is fp32 on CPUs (no encoder keeps its answers in bf16): no help text may say otherwise."""
    import contextlib
    import io

    from geoindex.interfaces.cli import build_parser
    from geoindex.models.precision import PRECISION_HELP
    from pipelines import build_index, evaluate

    helps = []
    for parse in (lambda: build_parser().parse_args(["locate", "--help"]), lambda: build_index.parse_args(["--help"]),
                  lambda: evaluate.parse_args(["--help"])):
        out = io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):
            parse()
        helps.append(" ".join(out.getvalue().split()))
    for text in helps:
        assert " ".join(PRECISION_HELP.split()) in text
    for path, text in _texts().items():
        for stale in ("auto (bf16 on CPUs", "``auto``: bf16 on CPUs", "default auto: bf16"):
            assert stale not in text, path
