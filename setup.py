"""Package discovery with the design card's layout: s2l_plugin/ plus hooks/ and adapters/ installed
as s2l_plugin.hooks and s2l_plugin.adapters. Everything else is in pyproject.toml."""

from setuptools import find_namespace_packages, setup

MAPPED = {"s2l_plugin.hooks": "hooks", "s2l_plugin.adapters": "adapters"}


def packages() -> list[str]:
    found = find_namespace_packages(include=["s2l_plugin", "s2l_plugin.*"], exclude=["*__pycache__*"])
    for package, folder in MAPPED.items():
        found += [package] + [f"{package}.{sub}" for sub in find_namespace_packages(where=folder, exclude=["*__pycache__*"])]
    return found


setup(packages=packages(), package_dir={"s2l_plugin": "s2l_plugin", **MAPPED})
