"""De-identification: PS3.15 Annex E Basic Profile and options, keyed UID remapping, date shifting,
deid recipes and burned-in text rules.

A functional core with no Django: ``Deidentifier(secret_key).deidentify_file(src, dst, ids)`` is all a
notebook needs; :func:`deid_folder` runs the engine over a folder with an identifier provider;
:func:`build_deidentifier` builds the engine from the configuration's text values.
"""

from collections.abc import Mapping
from typing import Any

from sendit.deid.engine import Deidentifier, DeidResult
from sendit.deid.errors import BurnedInError, DeidError
from sendit.deid.folder import FolderSummary, deid_folder
from sendit.deid.ocr import OcrSettings
from sendit.deid.profile import DeidOptions
from sendit.deid.recipe import Recipe, RecipeError, load_recipe, parse_recipe


def build_deidentifier(
    secret_key: str | bytes,
    options: str,
    recipe: str = "",
    pixel_filter: str = "default",
    *,
    site_filter: str = "",
    ocr: OcrSettings | None = None,
) -> Deidentifier:
    """The engine from config text: ``options`` a comma list of option names, ``recipe`` a recipe path
    (or empty), ``pixel_filter`` ``default``, ``none`` or a recipe path, ``site_filter`` recipe text
    whose ``%filter`` rules join the pixel filter (a site's blanking rules); ``ocr`` the OCR_* keys
    (:func:`ocr_settings`). Raises ``ValueError`` (``RecipeError`` is one) on a bad value."""
    chosen = DeidOptions.from_names(options.split(","))
    header = load_recipe(recipe) if recipe.strip() else None
    if pixel_filter.strip().lower() in ("", "none"):
        rules: Recipe | None = None
    else:
        rules = load_recipe("default" if pixel_filter.strip().lower() == "default" else pixel_filter)
    if site_filter.strip():
        site = parse_recipe(site_filter, "site blanking rules")
        rules = rules.extended(site) if rules is not None else site
    return Deidentifier(secret_key, chosen, recipe=header, pixel_filter=rules, ocr=ocr)


def ocr_settings(values: Mapping[str, Any]) -> OcrSettings:
    """The OCR_* configuration keys (a ``Config.values`` mapping) as the engine's settings."""
    return OcrSettings(
        enabled=bool(values["OCR"]),
        on_text=str(values["OCR_ON_TEXT"]),
        every_nth_frame=int(values["OCR_EVERY_NTH_FRAME"]),
        max_side=int(values["OCR_MAX_SIDE"]),
        release_confidence=int(values["OCR_RELEASE_CONFIDENCE"]) / 100.0,
    )


__all__ = [
    "BurnedInError",
    "DeidError",
    "DeidOptions",
    "DeidResult",
    "Deidentifier",
    "FolderSummary",
    "Recipe",
    "RecipeError",
    "build_deidentifier",
    "deid_folder",
    "load_recipe",
    "ocr_settings",
    "parse_recipe",
]
