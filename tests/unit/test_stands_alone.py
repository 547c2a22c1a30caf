"""The project stands alone: code and docs cite the DeepSeek-V3 report (arXiv 2412.19437) or this repository's
own docs/, never design notes kept outside it (a `SPEC §` section, a `../shared` path)."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
OUTSIDE = re.compile(r"SPEC(\.md)? ?§|SPEC \d|\.\./shared|shared/docs")
SUFFIXES = {".py", ".md", ".yaml", ".sbatch", ".sh", ".toml"}


def test_no_reference_outside_the_repository():
    offenders = []
    for path in sorted(ROOT.rglob("*")):
        rel = path.relative_to(ROOT)
        if path.suffix not in SUFFIXES or rel.parts[0] in (".venv", ".git", "runs", "data") or not path.is_file():
            continue
        for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            if OUTSIDE.search(line) and path != Path(__file__).resolve():
                offenders.append(f"{rel}:{number}: {line.strip()[:100]}")
    assert not offenders, "references outside the repository:\n" + "\n".join(offenders)
