"""examples/selector_study.py runs end to end at toy sizes and fills docs/SELECTORS.md's sections
(no timing is asserted: the numbers are the study's, not the test's)."""

import shutil
from pathlib import Path

from examples import selector_study

DOC = Path(__file__).resolve().parents[1] / "docs" / "SELECTORS.md"


def test_the_study_fills_every_generated_section(tmp_path, capsys):
    doc = shutil.copy(DOC, tmp_path / "SELECTORS.md")
    selector_study.main(["--n", "1", "--sweep-n", "1", "--densities", "0.1,0.5", "--calibration", "10", "--prompts", "1", "--lengths", "16", "--reps", "1",
                         "--d-model", "128", "--doc", str(doc)])
    text = Path(doc).read_text()
    for name in ("demo", "sweep", "kl", "cost"):
        section = text.split(f"<!-- generated: {name} -->")[1].split(f"<!-- end: {name} -->")[0]
        assert f"--only {name}" in section and "|---|" in section
    assert "| trained predictor (IFPruning) |" in text and "| random mask |" in text
    assert "| 0.25 | " in text  # a KL row per density
    assert "| training-free, GRIFFIN (dense prefill) | " in text.split("<!-- generated: sweep -->")[1]
    assert (tmp_path / "selectors_density.png").stat().st_size > 10_000
    assert text.split("<!-- end: cost -->")[1] == DOC.read_text().split("<!-- end: cost -->")[1]
