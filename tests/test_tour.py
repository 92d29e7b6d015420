"""The README's five-minute tour: scripts/tour.sh runs it, and the README shows the script's
commands (each command of the README's tour block must be a command of the script, so neither
can change without the other)."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "tour.sh"
TOUR_HEADING = "## A five-minute tour"


def _commands(lines: list[str]) -> list[str]:
    """Shell lines joined across backslash continuations, whitespace collapsed, comments and
    blank lines dropped."""
    out, current = [], ""
    for line in lines:
        stripped = line.strip()
        if not current and (not stripped or stripped.startswith("#")):
            continue
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        out.append(" ".join((current + stripped).split()))
        current = ""
    if current:
        out.append(" ".join(current.split()))
    return out


def readme_tour() -> list[str]:
    """The commands of the README's tour: its section's first ```bash block."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert TOUR_HEADING in text, f"README.md has no section {TOUR_HEADING!r}"
    section = text.split(TOUR_HEADING, 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```bash\n(.*?)```", section, re.S)
    assert block, f"README.md's {TOUR_HEADING!r} section has no ```bash block"
    return _commands(block.group(1).splitlines())


def script_commands() -> list[str]:
    """The commands the script runs: its ``run ...`` lines without the ``run`` prefix."""
    return [c.removeprefix("run ") for c in _commands(SCRIPT.read_text().splitlines())
            if c.startswith("run ")]


def test_readme_tour_is_the_script():
    tour = [c for c in readme_tour() if c.startswith(("nasopt ", "python "))]
    script = script_commands()
    assert len(tour) >= 10, tour
    missing = [c for c in tour if c not in script]
    assert not missing, f"README tour commands not in scripts/tour.sh: {missing}"
    not_shown = [c for c in script if c not in tour]
    assert not not_shown, f"scripts/tour.sh commands the README's tour does not show: {not_shown}"


def test_tour_runs(tmp_path):
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    work = tmp_path / "tour"
    done = subprocess.run(["bash", str(SCRIPT), str(work)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    for name in ("runs/studies.db", "pareto.png", "report.html", "model/model.packed",
                 "model/weights.pt", "model/arch.json"):
        assert (work / name).is_file(), name
    found = re.search(r"test accuracy (0\.\d+)", done.stdout)
    assert found, done.stdout[-2000:]
    # the README says "about 60 %" for the exported model's inherited weights
    assert 0.5 <= float(found.group(1)) <= 0.75, found.group(0)
    assert "tour done" in done.stdout
