"""Maps the repository's folders to collision-free import names (see pyproject.toml)."""

from setuptools import find_packages, setup

PACKAGE_DIRS = {"llmepp": "epp", "llmepp.plugins": "plugins", "llmepp_sim": "simulator"}

packages = []
for name, folder in PACKAGE_DIRS.items():
    packages.append(name)
    packages += [f"{name}.{sub}" for sub in find_packages(folder)]

setup(packages=packages, package_dir=PACKAGE_DIRS)
