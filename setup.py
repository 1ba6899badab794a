"""Packaging beyond what pyproject.toml can say: the shipped sweep files.

The sweep files live in the top-level sweeps/ (the product's layout), not inside the package, so the wheel
maps them in as the data package `pd_lightning.sweeps` (package-data in pyproject.toml); pyproject's own
package finder cannot add a package from another directory. An editable install reads sweeps/ where it is
(pd_lightning.sweep.spec.SHIPPED_SWEEP_DIRS). Everything else is in pyproject.toml.
"""

from setuptools import find_namespace_packages, setup

setup(
    packages=find_namespace_packages(include=["pd_lightning*", "analysis*"]) + ["pd_lightning.sweeps"],
    package_dir={"pd_lightning.sweeps": "sweeps"},
)
