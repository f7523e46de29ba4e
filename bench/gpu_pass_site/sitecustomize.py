"""lowrank importable from this checkout without installing it: ``./run gpu-pass`` puts this folder
and the repository root on PYTHONPATH, so every process of the pass (test workers, benchmarks, the
ranks of distributed tests) runs this at start-up. A lent GPU machine has no network and maybe a
setuptools too old for pyproject.toml, so no install: ``lowrank`` is found on PYTHONPATH, and
``lowrank.kernels``, which lives at the top level (``kernels/``, pyproject's package-dir), is found
here."""

import importlib.util
import sys
from pathlib import Path

KERNELS = Path(__file__).resolve().parents[2] / "kernels"


class KernelsFinder:
    """Finds ``lowrank.kernels`` (and so its modules) in the repository's ``kernels/``."""

    @staticmethod
    def find_spec(name, path=None, target=None):
        if name != "lowrank.kernels":
            return None
        return importlib.util.spec_from_file_location(
            name, KERNELS / "__init__.py", submodule_search_locations=[str(KERNELS)])


sys.meta_path.append(KernelsFinder)
