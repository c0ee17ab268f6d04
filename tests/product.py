"""The product's modules as pyproject.toml declares them (packages and their folders), for the tests that read
the source itself (tests/test_imports.py, tests/test_house.py)."""

from __future__ import annotations

import pathlib
import tomllib

ROOT = pathlib.Path(__file__).resolve().parents[1]


def product_modules() -> dict[str, pathlib.Path]:
    """Module name ("zb.passes.plan", "zb.runtime" for an __init__) -> its file, for every .py of every package."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    folders = config.get("package-dir", {})
    modules = {}
    for package in config["packages"]:
        for path in sorted((ROOT / folders.get(package, package.replace(".", "/"))).glob("*.py")):
            modules[package if path.stem == "__init__" else f"{package}.{path.stem}"] = path
    return modules
