"""Optional dependencies: the core needs none of them; a feature that does names the extra to install."""
from __future__ import annotations

import importlib
from types import ModuleType

from anomalyvfm.errors import UserInputError


def require(module: str, extra: str, feature: str) -> ModuleType:
    """Import `module`, or fail in one line telling the user which extra brings it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise UserInputError(f"{feature} needs the optional package '{module.split('.')[0]}': "
                             f"pip install 'anomalyvfm[{extra}]'") from None
