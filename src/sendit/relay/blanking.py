"""Site blanking rules: a reviewer draws a rectangle on a quarantined image, and every image of the
same layout (modality, maker, model, size) gets that region blanked from then on.

The rules are stored in the database (``BlankingRule``) and read as one more ``%filter graylist``
recipe next to DEID_FILTER (:func:`site_filter_text`, used by ``runtime.deidentifier``). A graylist
label that matches wins over the blacklist (see ``sendit.deid.pixels``): the image is cleaned, not
quarantined. The same text is shown to the reviewer, to copy into the DEID_FILTER file if the site
prefers rules in a file (then deactivate the database rule in the admin).

Criteria are layout facts only; a maker or model name with characters a recipe line cannot carry
(``#``, ``|``, anything but letters, digits, space, ``.``, ``_``, ``-``) is left out, which makes the
rule broader only within the same modality and image size.
"""

from __future__ import annotations

import re
from typing import Any

from pydicom.dataset import Dataset

from sendit.relay.models import BlankingRule

_SAFE = re.compile(r"^[A-Za-z0-9._-]+( [A-Za-z0-9._-]+)*$")
HEADER = "FORMAT dicom\n\n%filter graylist\n"


class RuleError(ValueError):
    """The rectangle or the image cannot make a rule; the text says why (no values)."""


def _safe(value: Any) -> str:
    text = str(value or "").strip()
    return text if len(text) <= 64 and _SAFE.match(text) else ""


def label_text(rule: BlankingRule) -> str:
    """The rule as a recipe LABEL block (``%filter graylist`` syntax of sendit.deid.recipe)."""
    lines = [f"LABEL site rule {rule.pk}", f"  equals Modality {rule.modality}"]
    if rule.manufacturer:
        lines.append(f"  + equals Manufacturer {rule.manufacturer}")
    if rule.model_name:
        lines.append(f"  + equals ManufacturerModelName {rule.model_name}")
    lines.append(f"  + equals Rows {rule.rows}")
    lines.append(f"  + equals Columns {rule.columns}")
    lines.append(f"  coordinates {rule.x0},{rule.y0},{rule.x1},{rule.y1}")
    return "\n".join(lines) + "\n"


def filter_text(rules: list[BlankingRule]) -> str:
    return HEADER + "\n".join(label_text(rule) for rule in rules) if rules else ""


def site_filter_text() -> str:
    """Every active rule as one recipe, "" when there is none (one query)."""
    return filter_text(list(BlankingRule.objects.filter(active=True).order_by("id")))


def create(ds: Dataset, region: tuple[int, int, int, int], user: Any, image_id: int | None) -> BlankingRule:
    """A rule from the image's layout and a rectangle (x0, y0, x1, y1; end-exclusive pixels)."""
    modality = _safe(ds.get("Modality"))
    if not modality:
        raise RuleError("the image has no usable Modality for a rule")
    try:
        rows, columns = int(ds.Rows), int(ds.Columns)
    except (AttributeError, TypeError, ValueError):
        raise RuleError("the image has no Rows and Columns") from None
    x0, y0, x1, y1 = (int(v) for v in region)
    x0, x1 = max(0, min(x0, columns)), max(0, min(x1, columns))
    y0, y1 = max(0, min(y0, rows)), max(0, min(y1, rows))
    if x1 <= x0 or y1 <= y0:
        raise RuleError("the rectangle is empty")
    return BlankingRule.objects.create(
        modality=modality,
        manufacturer=_safe(ds.get("Manufacturer")),
        model_name=_safe(ds.get("ManufacturerModelName")),
        rows=rows,
        columns=columns,
        x0=x0,
        y0=y0,
        x1=x1,
        y1=y1,
        image_id_was=image_id,
        user=user if getattr(user, "pk", None) else None,
    )
