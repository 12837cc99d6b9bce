"""Resolve IDENTIFIER_PROVIDER ("package.module.Class") to a ready provider.

Sites with their own identifier API write one small class and name it in the configuration; nothing
in Sendit needs to change. Problems are reported at start-up with the configured path, not later as a
failing series.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Mapping
from typing import Any, cast

from sendit.identifiers.base import IdentifierProvider


class ProviderLoadError(ValueError):
    """IDENTIFIER_PROVIDER does not name a usable provider; a configuration error."""


def _split(dotted_path: str) -> tuple[str, str]:
    path = dotted_path.strip()
    module_name, sep, attr = path.rpartition(":") if ":" in path else path.rpartition(".")
    if not sep or not module_name or not attr.isidentifier():
        raise ProviderLoadError(
            f"IDENTIFIER_PROVIDER {dotted_path!r} is not a dotted path such as 'package.module.Class'"
        )
    return module_name, attr


def load_provider(dotted_path: str, settings: Mapping[str, Any] | None = None) -> IdentifierProvider:
    """Import the class at ``dotted_path`` and build it with ``settings=<the whole configuration>``.

    Passing the whole mapping keeps the contract to one keyword: each provider reads the keys it
    needs and validates them itself (raising ValueError with the key's name).
    """
    module_name, attr = _split(dotted_path)
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # any failure while importing is a configuration problem
        raise ProviderLoadError(
            f"IDENTIFIER_PROVIDER {dotted_path!r}: cannot import {module_name!r} ({type(exc).__name__}: {exc})"
        ) from exc
    factory = getattr(module, attr, None)
    if factory is None:
        raise ProviderLoadError(f"IDENTIFIER_PROVIDER {dotted_path!r}: {module_name!r} has no {attr!r}")
    if not callable(factory):
        raise ProviderLoadError(f"IDENTIFIER_PROVIDER {dotted_path!r} is not a class")
    if inspect.isclass(factory) and not callable(getattr(factory, "identify", None)):
        raise ProviderLoadError(f"IDENTIFIER_PROVIDER {dotted_path!r} has no identify() method")
    try:
        inspect.signature(factory).bind(settings=settings)
    except TypeError:
        raise ProviderLoadError(
            f"IDENTIFIER_PROVIDER {dotted_path!r} must accept a 'settings' keyword argument"
        ) from None
    except ValueError:  # no signature available (some builtins); let the call itself decide
        pass
    provider = factory(settings=settings if settings is not None else {})
    if not callable(getattr(provider, "identify", None)):
        raise ProviderLoadError(f"IDENTIFIER_PROVIDER {dotted_path!r} built an object without identify()")
    return cast(IdentifierProvider, provider)
