"""What the README and the scripts' own texts tell a new user is so: names, folders, samples."""

import glob
import os
import pathlib
import re
import shutil
import subprocess

import pytest
from conftest import REPO_ROOT

README = (REPO_ROOT / "README.md").read_text(encoding="utf-8")


def test_every_script_our_code_names_exists():
    here = {os.path.basename(p) for pattern in ("*.py", "benchmarks/*.py", "tests/*.py")
            for p in glob.glob(str(REPO_ROOT / pattern))}
    missing = []
    for path in sorted(glob.glob(str(REPO_ROOT / "*.py"))):
        text = pathlib.Path(path).read_text(encoding="utf-8")
        for name in re.findall(r"(?<![\w/.-])([A-Za-z_]\w*\.py)\b", text):
            if name not in here:
                missing.append(f"{os.path.basename(path)} names {name}")
    assert missing == []


def _readme_command_outputs():
    """Relative output paths of the README's shell commands (code blocks), and the demo folders."""
    lines, inside = [], False
    for line in README.splitlines():
        if line.startswith("```"):
            inside = not inside
        elif inside:
            lines.append(line)
    blocks = "\n".join(lines)
    found = re.findall(r"(?:--output_dir|--output_file|OUTPUT_DIR)=([^\s`'\"]+)", blocks)
    paths = {p for p in found if not p.startswith(("$", "/", "gs://"))}
    assert {"out/pretrain", "records/train.tfrecord", "hf_lcqmc", "google_ckpt", "imported",
            "tf_records"} <= paths, paths
    return sorted(paths | {"demo_output", "demo_output_my", "demo_output_my-2", "hf_mlm"})


@pytest.mark.skipif(shutil.which("git") is None or not (REPO_ROOT / ".git").exists(),
                    reason="needs git and a checkout")
def test_what_the_readme_commands_write_in_the_repo_root_is_git_ignored():
    not_ignored = []
    for path in _readme_command_outputs():
        probe = path if path.endswith(".tfrecord") else path + "/x"  # a file inside a folder
        if subprocess.run(["git", "check-ignore", "-q", probe], cwd=REPO_ROOT).returncode != 0:
            not_ignored.append(path)
    assert not_ignored == []


def test_readme_demo_sample_shows_the_folder_the_demo_writes():
    sample = README[README.index("demo finished in"):]
    sample = sample[:sample.index("```")]
    assert "everything is under demo_output\n" in sample
    assert "demo_output/learning_curve.png" in sample and "/tmp/" not in sample
