"""Roles: Django groups of permissions, made (and kept equal to this table) after every migrate.

- **viewer**: the dashboard, series, counts (every account can see these; the group says so);
- **operator**: also retry, release and "retry now" (``relay.change_series``);
- **reviewer**: also the original data of quarantined images and rejected files (header, preview,
  download, original accession/MRN search), blanking rules, discard, identifier responses;
- **admin**: everything, and /admin/ (a superuser; the group holds every relay permission).

A token acts with its user's permissions: a script account made without a role can look, not act.
"""

from __future__ import annotations

from typing import Any

VIEW = ("relay.view_series", "relay.view_image")
CHANGE = "relay.change_series"
REVIEW = "relay.review_image"
DISCARD = "relay.discard_image"
IDENTIFIERS = "relay.view_identifier_response"

ROLES: dict[str, tuple[str, ...]] = {
    "viewer": VIEW,
    "operator": (*VIEW, CHANGE),
    "reviewer": (*VIEW, CHANGE, REVIEW, DISCARD, IDENTIFIERS),
    "admin": (*VIEW, CHANGE, REVIEW, DISCARD, IDENTIFIERS),
}


def sync_groups(**_: Any) -> None:
    """Create the role groups and set their permissions to the table above (post_migrate)."""
    from django.contrib.auth.models import Group, Permission

    for role, names in ROLES.items():
        group, _created = Group.objects.get_or_create(name=role)
        wanted: list[Permission] = []
        for name in names:
            app, codename = name.split(".")
            wanted.extend(Permission.objects.filter(content_type__app_label=app, codename=codename))
        group.permissions.set(wanted)


def assign(user: Any, role: str) -> None:
    """Give ``user`` exactly ``role`` (replacing any other role group); admin also makes a superuser."""
    from django.contrib.auth.models import Group

    if role not in ROLES:
        raise ValueError(f"unknown role {role!r} (known: {', '.join(ROLES)})")
    sync_groups()
    user.groups.remove(*Group.objects.filter(name__in=ROLES))
    user.groups.add(Group.objects.get(name=role))
    admin = role == "admin"
    if bool(user.is_staff) != admin or bool(user.is_superuser) != admin:
        user.is_staff = user.is_superuser = admin
        user.save(update_fields=["is_staff", "is_superuser"])


def role_of(user: Any) -> str:
    """The highest role a user holds (by permissions), for the page header."""
    if getattr(user, "is_superuser", False):
        return "admin"
    if user.has_perm(REVIEW):
        return "reviewer"
    if user.has_perm(CHANGE):
        return "operator"
    return "viewer"
