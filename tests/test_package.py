"""The distribution: one version (pyproject.toml), read back by the installed package."""

from __future__ import annotations

import tomllib
from pathlib import Path

import titans

ROOT = Path(__file__).resolve().parents[1]


def test_version_comes_from_pyproject_alone():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["name"] == "titans-ltm"
    assert titans.__version__ == project["version"]
    changelog = (ROOT / "CHANGELOG.md").read_text()
    assert f"## {project['version']}" in changelog  # every version says what it changed


def test_the_wheel_carries_what_the_demo_needs_and_runs_where_it_is_installed(tmp_path):
    """Build the sdist and wheel (``python -m build``) from a copy of the sources, install the wheel
    alone into a fresh directory and run it from there (help and a short needle evaluation) with the
    interpreter's site (and its editable install of this checkout) turned off."""
    import shutil
    import subprocess
    import sys
    import sysconfig
    import tarfile
    import zipfile

    src = tmp_path / "src"
    shutil.copytree(ROOT / "titans", src / "titans", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    run = lambda *args, **kw: subprocess.run(args, capture_output=True, text=True, timeout=600, **kw)  # noqa: E731
    built = run(sys.executable, "-m", "build", "--no-isolation", "--outdir", str(tmp_path / "dist"), str(src))
    assert built.returncode == 0, (built.stdout + built.stderr)[-2000:]
    (wheel,) = (tmp_path / "dist").glob("titans_ltm-*.whl")
    (sdist,) = (tmp_path / "dist").glob("titans_ltm-*.tar.gz")
    with tarfile.open(sdist) as tar:
        packed = {name.split("/", 1)[-1] for name in tar.getnames()}
    assert {"pyproject.toml", "README.md", "titans/__init__.py", "titans/recipes/recall-mag-4.yaml"} <= packed
    names = set(zipfile.ZipFile(wheel).namelist())
    for needed in ("titans/recipes/recall-mag-4.yaml", "titans/checkpoints/recall-mag-4/model.safetensors",
                   "titans/checkpoints/recall-mag-4/run.json", "titans/__main__.py"):  # fmt: skip
        assert needed in names, needed
    site = tmp_path / "site"
    installed = run(sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel))
    assert installed.returncode == 0, installed.stderr[-2000:]
    # -S: no site, so no editable finder for this checkout; the dependencies come after the wheel
    env = {"PYTHONPATH": f"{site}:{sysconfig.get_paths()['purelib']}", "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    probe = ("import titans, titans.train.checkpoint as c; print(titans.__file__); print(titans.__version__); "
             "m, t, i = c.load_pretrained(c.__file__.rsplit('/train/', 1)[0] + '/checkpoints/recall-mag-4'); "
             "print(type(m).__name__, m.cfg.variant, t.vocab_size)")  # fmt: skip
    out = run(sys.executable, "-S", "-c", probe, cwd=tmp_path, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    where, version, model = out.stdout.split("\n")[:3]
    assert where.startswith(str(site)) and version == titans.__version__ and model.startswith("TitansLM mag")
    helped = run(sys.executable, "-S", "-m", "titans", "demo", "--help", cwd=tmp_path, env=env)
    assert helped.returncode == 0 and "niah" in helped.stdout, helped.stderr[-2000:]
    # a short real run of the installed package: the shipped MAG answers two needle prompts
    smoke = run(sys.executable, "-S", "-m", "titans", "eval", "niah", "--checkpoint",
                str(site / "titans" / "checkpoints" / "recall-mag-4"), "--variants", "mk-pk", "--lengths", "1K",
                "--samples", "2", "--no-progress", "--out", str(tmp_path / "smoke"), cwd=tmp_path, env=env)  # fmt: skip
    assert smoke.returncode == 0 and "MK-NIAH-PK" in smoke.stdout, (smoke.stdout + smoke.stderr)[-2000:]
