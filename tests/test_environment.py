"""The test environment: every requirement pinned, and no package that our modules shadow."""
import os
import re
import subprocess
import sys

from conftest import ROOT


def _names(path):
    """The package names a requirements file lists (its -r/-c lines followed)."""
    names = set()
    with open(path) as f:
        for line in f:
            line = line.split("#")[0].strip()
            if line.startswith("-r"):
                names |= _names(os.path.join(os.path.dirname(path), line[2:].strip()))
            elif line and not line.startswith("-"):
                names.add(re.split(r"[=<>!~;\[ ]", line)[0].lower())
    return names


def test_every_requirement_is_pinned_to_one_version():
    with open(os.path.join(ROOT, "constraints.txt")) as f:
        pins = dict(line.strip().lower().split("==") for line in f
                    if line.strip() and not line.startswith("#"))
    for req in ("requirements.txt", "requirements-test.txt"):
        with open(os.path.join(ROOT, req)) as f:
            assert "-c constraints.txt" in f.read().splitlines(), req
        for line in open(os.path.join(ROOT, req)):  # pinned in the file too, to the same version
            body = line.split("#")[0].strip()
            if body and not body.startswith("-"):
                name, _, version = body.partition("==")
                assert version == pins[name.lower()], (req, body)
    wanted = _names(os.path.join(ROOT, "requirements-test.txt"))
    assert {"torch", "transformers", "triton", "pytest"} <= wanted
    assert sorted(wanted - set(pins)) == []
    assert pins["torch"] == "2.13.0" and "kernels" not in pins


def test_the_tests_refuse_to_start_beside_hugging_faces_kernels_package(tmp_path):
    # An installed distribution is a dist-info folder on the path: a fake one is enough.
    info = tmp_path / "kernels-0.19.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: kernels\nVersion: 0.19.1\n")
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "--co", "-p", "no:cacheprovider",
                          "tests/test_environment.py"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert run.returncode == 2
    lines = [line for line in (run.stdout + run.stderr).splitlines() if line.strip()]
    assert len(lines) == 1 and "pip uninstall -y kernels" in lines[0], lines
