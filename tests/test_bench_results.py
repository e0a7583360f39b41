"""The results files' header (benchmarks/results_file.py): which code a results file measured."""

import subprocess

from results_file import git_commit, git_tree  # benchmarks/ is on sys.path (pyproject.toml: pytest pythonpath)


def git(repo, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True, text=True).stdout.strip()


def test_tree_names_the_commit_of_the_files_even_where_head_is_stale(tmp_path):
    """A copy whose HEAD stayed behind (the device tool's) still records the tree of the commit whose files it holds:
    tracked and new files count, ignored ones do not, and the checkout's own index is left as it was."""
    repo = tmp_path / "repo"
    repo.mkdir()
    git(repo, "init", "-q")
    git(repo, "config", "user.email", "t@example.com")
    git(repo, "config", "user.name", "t")
    (repo / ".gitignore").write_text("build/\n")
    (repo / "code.py").write_text("x = 1\n")
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "first")
    assert git_tree(repo) == git(repo, "rev-parse", "HEAD^{tree}")
    assert git_commit(repo) == git(repo, "rev-parse", "--short", "HEAD")

    (repo / "code.py").write_text("x = 2\n")
    (repo / "new.py").write_text("y = 3\n")
    (repo / "build").mkdir()
    (repo / "build" / "out.so").write_text("binary")
    stale = git_tree(repo)
    assert git(repo, "diff", "--cached", "--name-only") == ""  # nothing staged in the checkout's own index
    assert git_commit(repo).endswith("-dirty") and stale != git(repo, "rev-parse", "HEAD^{tree}")

    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "second")  # what the later commit holds: the files measured above
    assert stale == git(repo, "rev-parse", "HEAD^{tree}")
    assert "build" not in git(repo, "ls-tree", "--name-only", "HEAD")


def test_tree_is_unknown_outside_a_checkout(tmp_path):
    assert git_tree(tmp_path) == "unknown"
