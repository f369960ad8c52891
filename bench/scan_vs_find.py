"""Time ``npmguard scan ROOT --json`` against ``find ROOT -name .npmrc``.

The script builds a tree of projects in a temp dir: package.json files,
source dirs, node_modules trees that the scan skips, about 50 ``.npmrc``
files (a few with fake tokens) and a few git repositories. It then runs each
command several times and prints the median wall times and their ratios.
The temp dir is removed at the end unless ``--keep`` is given.

    .venv/bin/python bench/scan_vs_find.py [--dirs 10000] [--runs 7]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

# A fake token: the scan reports it but no registry would take it.
FAKE_TOKEN = "npm_benchmarkFakeToken0000000000000000"
SOURCE_DIRS = ("src", "src/components", "src/utils", "lib", "test", "docs", "scripts")


class TreeBuilder:
    """A directory maker that counts what it creates and stops at ``limit``."""

    def __init__(self, root: Path, limit: int, seed: int) -> None:
        self.root = root
        self.limit = limit
        self.count = 0
        self.random = random.Random(seed)
        self.npmrc: list[Path] = []

    def full(self) -> bool:
        return self.count >= self.limit

    def mkdir(self, path: Path) -> bool:
        if self.full():
            return False
        path.mkdir(parents=False)
        self.count += 1
        return True

    def node_modules(self, project: Path, packages: int) -> None:
        """Add a flat node_modules tree of packages, as npm lays them out."""
        modules = project / "node_modules"
        if not self.mkdir(modules):
            return
        for index in range(packages):
            package = modules / f"pkg-{index}"
            if not self.mkdir(package):
                return
            (package / "package.json").write_text('{"name": "pkg"}\n')
            for sub in ("lib", "dist"):
                if not self.mkdir(package / sub):
                    return
            if index % 7 == 0:
                # Published packages sometimes ship an .npmrc; the scan skips them.
                (package / ".npmrc").write_text("package-lock=false\n")

    def project(self, path: Path, with_modules: bool) -> None:
        if not self.mkdir(path):
            return
        (path / "package.json").write_text('{"name": "app", "version": "1.0.0"}\n')
        for sub in SOURCE_DIRS:
            if not self.mkdir(path / sub):
                return
            (path / sub / "index.js").write_text("module.exports = {}\n")
        if with_modules:
            self.node_modules(path, self.random.randint(20, 80))


def build_tree(root: Path, dirs: int, npmrc_files: int, tokens: int,
               repos: int, seed: int) -> TreeBuilder:
    builder = TreeBuilder(root, dirs, seed)
    src = root / "src"
    builder.mkdir(src)
    org_index = 0
    projects: list[Path] = []
    while not builder.full():
        org = src / f"org-{org_index}"
        org_index += 1
        if not builder.mkdir(org):
            break
        for index in range(builder.random.randint(3, 12)):
            project = org / f"project-{index}"
            builder.project(project, with_modules=builder.random.random() < 0.3)
            if project.is_dir():
                projects.append(project)
            if builder.full():
                break
    chosen = builder.random.sample(projects, min(npmrc_files, len(projects)))
    for index, project in enumerate(chosen):
        path = project / ".npmrc"
        lines = ["registry=https://registry.npmjs.org/\n", "save-exact=true\n"]
        if index < tokens:
            lines.append(f"//registry.npmjs.org/:_authToken={FAKE_TOKEN}{index}\n")
        else:
            lines.append("//registry.npmjs.org/:_authToken=${NPM_TOKEN}\n")
        path.write_text("".join(lines))
        path.chmod(0o600)
        builder.npmrc.append(path)
    git_env = git_environment(root)
    for project in chosen[:repos]:
        subprocess.run(["git", "init", "-q"], cwd=project, env=git_env, check=True)
        subprocess.run(["git", "add", ".npmrc", "package.json"], cwd=project,
                       env=git_env, check=True)
        subprocess.run(["git", "commit", "-q", "-m", "init"], cwd=project,
                       env=git_env, check=True)
        builder.count += 1  # The .git directory, which both commands enter.
    return builder


def git_environment(root: Path) -> dict[str, str]:
    return {
        "PATH": os.environ.get("PATH", os.defpath),
        "HOME": str(root / "home"),
        "GIT_CONFIG_NOSYSTEM": "1",
        "GIT_AUTHOR_NAME": "bench",
        "GIT_AUTHOR_EMAIL": "bench@example.invalid",
        "GIT_COMMITTER_NAME": "bench",
        "GIT_COMMITTER_EMAIL": "bench@example.invalid",
    }


def timed(
    command: Sequence[str], env: dict[str, str], runs: int
) -> tuple[float, bytes]:
    """Return the median wall time of ``runs`` runs, after one warm-up run."""
    result = subprocess.run(command, env=env, capture_output=True, check=False)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        result = subprocess.run(command, env=env, capture_output=True, check=False)
        times.append(time.perf_counter() - start)
    return statistics.median(times), result.stdout


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dirs", type=int, default=10_000)
    parser.add_argument("--npmrc", type=int, default=50)
    parser.add_argument("--tokens", type=int, default=5)
    parser.add_argument("--repos", type=int, default=10,
                        help="projects with an .npmrc that are git repositories")
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--keep", action="store_true", help="keep the temp tree")
    args = parser.parse_args(argv)

    base = Path(tempfile.mkdtemp(prefix="npmguard-bench-"))
    try:
        home = base / "home"
        home.mkdir()
        root = base / "tree"
        root.mkdir()
        start = time.perf_counter()
        tree = build_tree(root, args.dirs, args.npmrc, args.tokens, args.repos,
                          args.seed)
        built = time.perf_counter() - start
        env = {
            "PATH": os.environ.get("PATH", os.defpath),
            "LANG": "C.UTF-8",
            "HOME": str(home),
            "NPM_CONFIG_USERCONFIG": str(home / ".npmrc"),
            "NPM_CONFIG_GLOBALCONFIG": str(base / "global-npmrc"),
            "XDG_STATE_HOME": str(home / ".local" / "state"),
            "GIT_CONFIG_NOSYSTEM": "1",
        }
        scan_cmd = [sys.executable, "-m", "npmguard", "scan", str(root), "--json"]
        find_cmd = ["find", str(root), "-name", ".npmrc"]
        pruned_cmd = ["find", str(root), "(", "-name", "node_modules", "-o",
                      "-name", ".git", ")", "-prune", "-o", "-name", ".npmrc",
                      "-print"]
        scan_time, scan_out = timed(scan_cmd, env, args.runs)
        find_time, find_out = timed(find_cmd, env, args.runs)
        pruned_time, pruned_out = timed(pruned_cmd, env, args.runs)

        report = json.loads(scan_out)
        print(f"tree: {tree.count} directories, {len(tree.npmrc)} project .npmrc "
              f"files ({args.tokens} with a token), {args.repos} git repos; "
              f"built in {built:.1f} s; {os.cpu_count()} CPUs")
        print(f"scan found {report['summary']['files']} files, "
              f"{report['summary']['plaintext']} plaintext; find found "
              f"{len(find_out.splitlines())} (pruned: {len(pruned_out.splitlines())})")
        print(f"median of {args.runs} runs after one warm-up:")
        print(f"  npmguard scan --json   {scan_time * 1000:8.1f} ms")
        print(f"  find -name .npmrc      {find_time * 1000:8.1f} ms")
        print(f"  find with prune        {pruned_time * 1000:8.1f} ms")
        print(f"ratio scan/find          {scan_time / find_time:8.2f}")
        print(f"ratio scan/find-pruned   {scan_time / pruned_time:8.2f}")
    finally:
        if args.keep:
            print(f"tree kept in {base}")
        else:
            shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
