"""Packaging: the wheel ships the config files as ``varjax.configs``, an installed copy resolves configs by name
or by checkout path from any directory, and setup.py declares every third-party module varjax imports."""

import ast
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# import name -> distribution name, where they differ
DISTRIBUTIONS = {
    "PIL": "pillow",
    "absl": "absl-py",
    "orbax": "orbax-checkpoint",
    "tensorflow": "tensorflow-cpu",
    "tensorflow_datasets": "tensorflow-datasets",
    "tensorboardX": "tensorboardX",
}


def _install_requires() -> set[str]:
    tree = ast.parse((ROOT / "setup.py").read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.keyword) and node.arg == "install_requires":
            reqs = ast.literal_eval(node.value)
            return {r.split(";")[0].split("[")[0].split(">")[0].split("=")[0].split("<")[0].strip().lower()
                    for r in reqs}
    raise AssertionError("setup.py has no install_requires")


def _imported_top_level_modules() -> set[str]:
    names = set()
    for path in list((ROOT / "varjax").rglob("*.py")) + list((ROOT / "configs").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
    return names


def test_every_imported_distribution_is_declared():
    third_party = _imported_top_level_modules() - set(sys.stdlib_module_names) - {"varjax", "__future__"}
    declared = {d.replace("_", "-") for d in _install_requires()}
    missing = sorted(m for m in third_party if DISTRIBUTIONS.get(m, m).lower().replace("_", "-") not in declared)
    assert not missing, f"imported by varjax but not in setup.py install_requires: {missing}"


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """The wheel built from the checkout, unpacked as site-packages would hold it."""
    pytest.importorskip("setuptools")
    pytest.importorskip("wheel")
    out = tmp_path_factory.mktemp("wheel")
    r = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", str(ROOT), "-w", str(out)],
        capture_output=True, text=True, timeout=300, cwd=out,
    )
    assert r.returncode == 0, r.stderr
    (wheel,) = out.glob("varjax-*.whl")
    site = out / "site"
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        z.extractall(site)
    return site, names


def test_wheel_ships_every_config(installed):
    _, names = installed
    for cfg in (ROOT / "configs").glob("*.py"):
        assert f"varjax/configs/{cfg.name}" in names, cfg.name
    assert "varjax/config.py" in names and "varjax/configs/common.py" in names
    # every package of the layout ships (an __init__.py in each folder of varjax/)
    for pkg in sorted(p.parent for p in (ROOT / "varjax").rglob("*.py")):
        rel = pkg.relative_to(ROOT).as_posix()
        assert f"{rel}/__init__.py" in names, rel
    for path in (ROOT / "varjax").rglob("*.py"):
        assert path.relative_to(ROOT).as_posix() in names, path


def test_installed_package_resolves_configs_without_the_checkout(installed, tmp_path):
    site, _ = installed
    code = (
        f"SITE = r'{site}'\n"
        "import importlib.util, pathlib, varjax\n"
        "from varjax.config import load, resolve_config\n"
        "assert pathlib.Path(varjax.__file__).is_relative_to(pathlib.Path(SITE)), varjax.__file__\n"
        "for spec in ('var_d16', 'configs/var_d16.py', 'tokenizer_shapes:runlocal'):\n"
        "    path = pathlib.Path(resolve_config(spec).partition(':')[0])\n"
        "    assert path.is_relative_to(pathlib.Path(SITE)), path\n"
        "    m = importlib.util.module_from_spec(importlib.util.spec_from_file_location('c', path))\n"
        "    m.__spec__.loader.exec_module(m)\n"
        "    print(spec, type(m.get_config()).__name__, load(spec).task)\n"
    )
    r = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=tmp_path,
        env={"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin", "JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "3",
             "VARJAX_COMPILE_CACHE": "off"},
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("ConfigDict") == 3 and r.stdout.count(" var\n") == 2, r.stdout


def test_checkout_resolves_names_and_paths(tmp_path, monkeypatch):
    from varjax.config import available, resolve_config

    monkeypatch.chdir(tmp_path)  # no configs/ here
    assert {"var_d16", "var_shapes", "tokenizer_shapes", "sweep_shapes", "ecar_shapes"} <= set(available())
    assert "common" not in available()  # the defaults, not a recipe
    assert resolve_config("var_d16").endswith("var_d16.py")
    assert resolve_config("configs/var_d16.py:x=1").endswith("var_d16.py:x=1")
    assert resolve_config("gs://bucket/c.py:a") == "gs://bucket/c.py:a"
    own = tmp_path / "mine.py"
    own.write_text("")
    assert resolve_config(f"{own}:a=1") == f"{own}:a=1"
    with pytest.raises(FileNotFoundError, match="var_d16"):
        resolve_config("var_d61")
    with pytest.raises(FileNotFoundError, match="elsewhere/var_d16.py"):
        resolve_config("elsewhere/var_d16.py")
