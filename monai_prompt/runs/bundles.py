"""Where the bundles are: the rendered ``bundles/`` folder of the repository.

``pyproject.toml`` ships it inside the installed package as the data package ``monai_prompt.bundles``
(``<site-packages>/monai_prompt/bundles``); in a source tree (a checkout, ``pip install -e .``) it sits beside the
package. Either way :func:`bundles_folder` finds it, so ``monai-prompt demo`` and the benchmarks run anywhere; an
explicit folder (``--bundles``, ``bundles=``) replaces it.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["bundles_folder", "find_bundle"]

_PACKAGE = Path(__file__).resolve().parents[1]
#: where the bundles are: inside the installed package, or beside it in a source tree.
_PLACES = (_PACKAGE / "bundles", _PACKAGE.parent / "bundles")


def bundles_folder(bundles: str | os.PathLike | None = None) -> Path:
    """The bundles folder: ``bundles`` when given, else the one that comes with the package.

    Args:
        bundles: an explicit bundles folder, or ``None``.

    Raises:
        FileNotFoundError: ``bundles`` is not a folder, or (``None``) the package has no bundles with it.
    """
    if bundles is not None:
        folder = Path(bundles)
        if not folder.is_dir():
            raise FileNotFoundError(f"bundles folder {folder} not found: pass the folder that holds the bundles "
                                    "(a checkout's bundles/).")
        return folder
    for folder in _PLACES:
        if folder.is_dir():
            return folder
    raise FileNotFoundError(
        f"no bundles with the package (looked in {' and '.join(map(str, _PLACES))}): install monai-prompt from "
        "its repository (pip install . ships bundles/ inside the package), or pass the bundles folder (--bundles)."
    )


def find_bundle(name: str, bundles: str | os.PathLike | None = None) -> Path:
    """The folder of bundle ``name`` (e.g. ``"vit_pretraining"``) in :func:`bundles_folder` ``(bundles)``.

    Args:
        name: the bundle's folder name.
        bundles: an explicit bundles folder, or ``None`` for the package's.

    Raises:
        FileNotFoundError: the folder has no such bundle (no ``configs/train.json``).
    """
    folder = bundles_folder(bundles) / name
    if not (folder / "configs" / "train.json").is_file():
        raise FileNotFoundError(f"{folder}/configs/train.json not found: {name} is not a bundle of "
                                f"{folder.parent} (monai-prompt render-bundles writes them).")
    return folder
