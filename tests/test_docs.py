"""The repository stands on its own: its README and docs/ link only to files it holds, and no
tracked file points outside it (a clone has nothing beside it to point at)."""
import re
import subprocess

from megapgs.config import REPO_ROOT

DOCS = [REPO_ROOT / "README.md", REPO_ROOT / "BENCHMARKS.md", *sorted((REPO_ROOT / "docs").glob("*.md"))]
OUTSIDE = "../" + "shared"  # spelled in two parts, so that this file does not name it
LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")


def test_no_tracked_file_points_outside_the_repository():
    tracked = subprocess.run(["git", "ls-files"], cwd=REPO_ROOT, capture_output=True, text=True,
                             check=True).stdout.split()
    offenders = []
    for name in tracked:
        path = REPO_ROOT / name
        if path.suffix in {".png", ".gz", ".tar"} or not path.is_file():
            continue
        text = path.read_text(errors="replace")
        if OUTSIDE in text:
            offenders.append(name)
    assert not offenders, f"these files name {OUTSIDE}: {offenders}"


def test_readme_links_the_design_and_the_algorithm():
    readme = (REPO_ROOT / "README.md").read_text()
    assert "(docs/DESIGN.md)" in readme and "(docs/PGS.md)" in readme


def test_every_local_link_of_the_docs_resolves():
    missing = []
    for doc in DOCS:
        for target in LINK.findall(doc.read_text()):
            if "://" in target or target.startswith("mailto:"):
                continue
            if not (doc.parent / target).exists():
                missing.append(f"{doc.relative_to(REPO_ROOT)} -> {target}")
    assert not missing, "broken links: " + ", ".join(missing)
