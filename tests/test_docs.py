"""What the README, docs/ and the notebook say must match what the code computes."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import jupytext
import pytest

from model import Net, count_parameters, format_layer_table, layer_table


@pytest.fixture(scope="module")
def readme(repo_root) -> str:
    return (repo_root / "README.md").read_text()


@pytest.fixture(scope="module")
def experiments(repo_root) -> str:
    return (repo_root / "docs" / "experiments.md").read_text()


def between(text: str, marker: str) -> str:
    match = re.search(rf"<!-- {marker} -->\n(.*?)\n<!-- /{marker} -->", text, re.S)
    assert match, f"no <!-- {marker} --> block where the test looks for it"
    return match.group(1).strip()


def test_readme_architecture_table_is_the_computed_one(readme):
    assert between(readme, "layer-table") == format_layer_table(layer_table(Net()))


def test_readme_states_the_parameter_count(readme):
    assert f"{count_parameters(Net()):,} parameters" in readme


def test_the_first_screen_has_the_result_and_how_to_open_train_and_test(readme):
    first = "\n".join(readme.splitlines()[:40])
    assert f"{count_parameters(Net()):,} parameters" in first
    assert "colab.research.google.com/github/" in first and "Session_6_Solution.ipynb" in first
    assert "python train.py" in first
    assert "<!-- /test-command -->" in first and "<!-- /quick-test-command -->" in first


def without_header(text: str) -> str:
    """Drop jupytext's YAML header, which records tool versions rather than content."""
    return re.sub(r"\A# ---\n.*?\n# ---\n", "", text, flags=re.S).strip()


def test_notebook_and_its_percent_script_are_in_sync(repo_root):
    nb = jupytext.read(repo_root / "Session_6_Solution.ipynb")
    as_text = jupytext.writes(nb, fmt="py:percent")
    paired = (repo_root / "docs" / "Session_6_Solution.py").read_text()
    assert without_header(as_text) == without_header(paired), (
        "run `jupytext --sync Session_6_Solution.ipynb` after editing either file")


def test_colab_badges_point_at_the_notebooks_repo(repo_root, readme):
    notebook = (repo_root / "docs" / "Session_6_Solution.py").read_text()
    repo = re.search(r'^REPO = "([^"]+)"', notebook, re.M).group(1)
    for text in (readme, notebook):
        links = re.findall(r"colab\.research\.google\.com/github/([^/]+/[^/]+)/", text)
        assert links and set(links) == {repo}


def test_ci_runs_the_readme_test_command(repo_root, readme):
    command = between(readme, "test-command").strip("`\n").removeprefix("bash\n").strip()
    ci = (repo_root / ".ci" / "run").read_text()
    assert "test-command" in ci  # CI extracts and runs that very block
    assert "pytest" in command


def test_readme_seed_table_is_the_reported_one(repo_root, readme):
    from benchmarks import seeds

    runs = seeds.load_runs(repo_root / "results")
    assert between(readme, "seeds-table") == seeds.side_by_side(runs, seeds.ordered(runs)), (
        "paste the table of `python benchmarks/seeds.py --report` into the README")


def test_the_experiments_ablation_table_is_the_reported_one(repo_root, experiments):
    from benchmarks import ablation

    table = ablation.format_table(ablation.summarise(ablation.load_results(
        repo_root / "results" / "ablation")))
    assert between(experiments, "ablation-table") == table, (
        "paste the table of `python benchmarks/ablation.py --report` into docs/experiments.md")


def test_readme_ablation_summary_is_the_reported_one(repo_root, readme):
    """The README's short table: each variant's parameters and mean final test accuracy, as
    the full report gives them."""
    from benchmarks import ablation

    rows = ablation.summarise(ablation.load_results(repo_root / "results" / "ablation"))
    (seeds,) = {len(r.seeds) for r in rows}  # one seed count for every variant
    lines = [f"| variant | what changes | parameters | final test acc % (mean of {seeds} seeds) |",
             "|---|---|---|---|"]
    lines += [f"| {r.variant} | {r.change} | {r.parameters:,} | {r.mean_test:.2f} |" for r in rows]
    assert between(readme, "ablation-summary") == "\n".join(lines), (
        "the README's summary of `python benchmarks/ablation.py --report` differs from it")


def test_the_experiments_parameters_table_is_the_reported_one(repo_root, experiments):
    """How many parameters 99.4% needs: both families (the table scaled, the compact model)."""
    from benchmarks import ablation

    table = ablation.parameters_table(
        ablation.load_results(repo_root / "results" / "ablation"),
        ablation.compact_runs(repo_root / "results" / "compact"))
    assert "compact (`--model compact`)" in table
    assert between(experiments, "parameters-table") == table, (
        "paste the second table of `python benchmarks/ablation.py --report` into "
        "docs/experiments.md")


def test_the_compact_pages_table_is_the_reported_one(repo_root):
    """The compact model's seeds, as benchmarks/compact.py --report gives them, in
    docs/compact.md (the README gives the named recipe's range and links there)."""
    from benchmarks import compact

    table = compact.report(repo_root / "results" / "compact")
    page = (repo_root / "docs" / "compact.md").read_text()
    assert between(page, "compact-table") == table, (
        "paste the table of `python benchmarks/compact.py --report` into docs/compact.md")


# ---------------------------------------------------------------------------------------------
# Links: every relative link of the README and docs/ leads somewhere.
# ---------------------------------------------------------------------------------------------
def without_code(text: str) -> str:
    """The Markdown without fenced blocks and inline code, where brackets are not links."""
    text = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
    return re.sub(r"`[^`\n]*`", "", text)


def github_slug(heading: str) -> str:
    """GitHub's anchor for a heading: lowercase, punctuation dropped except '-' and '_', each
    space a '-'."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """The heading anchors of a Markdown file; a repeated heading gets -1, -2, ... as on GitHub."""
    seen: dict[str, int] = {}
    found = set()
    text = re.sub(r"^```.*?^```", "", path.read_text(), flags=re.S | re.M)
    for heading in re.findall(r"^#{1,6} +(.+?) *#* *$", text, re.M):
        slug = github_slug(heading)
        found.add(slug if slug not in seen else f"{slug}-{seen[slug]}")
        seen[slug] = seen.get(slug, 0) + 1
    return found


def relative_links(path: Path) -> list[str]:
    links = re.findall(r"\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)", without_code(path.read_text()))
    return [link for link in links if not re.match(r"[a-z][a-z0-9+.-]*:", link, re.I)]


def documents(repo_root: Path) -> list[Path]:
    return [repo_root / "README.md", *sorted((repo_root / "docs").glob("*.md"))]


def test_github_slug_follows_githubs_rules():
    assert github_slug("How many parameters does 99.4% need?") == (
        "how-many-parameters-does-994-need")
    assert github_slug("Two loaders: `--loader fast` (default) and `--loader torchvision`") == (
        "two-loaders---loader-fast-default-and---loader-torchvision")
    assert github_slug("The course's checks") == "the-courses-checks"
    assert github_slug("snake_case and dash-es") == "snake_case-and-dash-es"


def test_every_relative_link_resolves(repo_root):
    broken = []
    for doc in documents(repo_root):
        for link in relative_links(doc):
            target, _, anchor = link.partition("#")
            path = (doc.parent / target).resolve() if target else doc
            if not path.exists():
                broken.append(f"{doc.name}: {link} (no such file)")
            elif anchor and path.suffix == ".md" and anchor not in anchors(path):
                broken.append(f"{doc.name}: {link} (no such heading in {path.name})")
    assert broken == []


def test_the_readme_links_every_doc(repo_root, readme):
    linked = {Path(link.partition("#")[0]).name for link in relative_links(repo_root / "README.md")
              if link.startswith("docs/")}
    assert {p.name for p in (repo_root / "docs").glob("*.md")} <= linked


# ---------------------------------------------------------------------------------------------
# The quick tier: one documented command, and what it covers.
# ---------------------------------------------------------------------------------------------
# Each area the README promises for the quick tier, and a test id (a prefix) that proves it.
QUICK_AREAS = {
    "the model's shapes and parameter count": "tests/test_model.py::test_parameter_count",
    "the course's checks": "tests/test_course_checks.py::",
    "the loaders: the fast loader's pixels equal torchvision's": "tests/test_fast_path.py::",
    "the MNIST files' checks": "tests/test_data.py::",
    "a short training and resume on real MNIST":
        "tests/test_checkpoints.py::test_resumed_run_equals_an_unbroken_run",
    "a checkpoint refused": "tests/test_checkpoints.py::test_refuses_",
    "the CLI's usage errors": "tests/test_cli.py::test_bad_arguments_are_usage_errors",
}


def quick_command(readme: str) -> list[str]:
    block = between(readme, "quick-test-command")
    assert block.startswith("```bash\n") and block.endswith("```"), block
    (line,) = block.removeprefix("```bash\n").removesuffix("```").strip().splitlines()
    return shlex.split(line)


def test_readme_quick_command_runs_the_quick_tier_of_the_tests_folder(repo_root, readme):
    words = quick_command(readme)
    assert words[0].endswith("/pytest"), words  # the venv's pytest, as a user types it
    args = words[1:]
    assert args[args.index("-m") + 1] == "quick"
    assert "tests" in args  # given paths replace pyproject's testpaths: not the notebook
    verbosity = [a for a in args if re.fullmatch(r"-q+|-v+|--quiet|--verbose", a)]
    args = [a for a in args if a not in verbosity]  # -q once lists the ids, -qq only counts
    pytest_command = str(Path(sys.executable).with_name("pytest"))
    done = subprocess.run([pytest_command, *args, "--collect-only", "-q", "-n", "0",
                           "-p", "no:cacheprovider"],
                          cwd=repo_root, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    ids = [line for line in done.stdout.splitlines() if "::" in line]
    assert not any(".ipynb" in i for i in ids)
    missing = [area for area, prefix in QUICK_AREAS.items()
               if not any(i.startswith(prefix) for i in ids)]
    assert missing == [], f"no quick test for: {missing}"


def careless_rows(section: str) -> int:
    """The cases in a section of docs/careless.md: its table's rows, header aside."""
    rows = [line for line in section.splitlines() if line.startswith("| ")]
    return len(rows) - 1


def test_the_readmes_reliability_line_counts_the_careless_user_cases(repo_root):
    doc = (repo_root / "docs" / "careless.md").read_text()
    _, first, second, notebook = doc.split("\n## ")
    cli, nb = careless_rows(first) + careless_rows(second), careless_rows(notebook)
    readme = " ".join((repo_root / "README.md").read_text().split())
    assert (f"{cli + nb} careless-user cases, {cli} on `train.py` and {nb} in the notebook"
            in readme)
    assert f"{nb} cases in the notebook's pass" in doc


def test_the_speedrun_tables_are_the_benchmarks_report(readme, repo_root):
    """docs/speedrun.md and the README hold `python benchmarks/speedrun.py --report`'s table of
    the side-by-side runs in results/speedrun/."""
    from benchmarks import speedrun

    table = speedrun.report(repo_root / "results" / "speedrun", figure=None)
    doc = (repo_root / "docs" / "speedrun.md").read_text()
    assert between(doc, "speedrun-table") == table, (
        "paste the table of `python benchmarks/speedrun.py --report` into docs/speedrun.md")
    assert between(readme, "speedrun-table") == table, (
        "paste the table of `python benchmarks/speedrun.py --report` into the README")
