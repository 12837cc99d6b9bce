"""The upgrade that brought roles: accounts made before keep their actions as operators (reviewers
if they could see identifier responses), and the groups hold the permissions of the roles table."""

from __future__ import annotations

import pytest
from django.core.management import call_command
from django.db import connection
from django.db.migrations.executor import MigrationExecutor

from sendit.relay.roles import ROLES

BEFORE = [("relay", "0008_review_roles_blanking")]


@pytest.mark.django_db(transaction=True)
def test_accounts_made_before_roles_become_operators_or_reviewers() -> None:
    executor = MigrationExecutor(connection)
    executor.migrate(BEFORE)
    old = executor.loader.project_state(BEFORE).apps
    user_model, permission = old.get_model("auth", "User"), old.get_model("auth", "Permission")
    plain = user_model.objects.create(username="plain-before")
    seer = user_model.objects.create(username="seer-before")
    seer.user_permissions.add(permission.objects.get(codename="view_identifier_response"))
    root = user_model.objects.create(username="root-before", is_superuser=True)
    call_command("migrate", verbosity=0)  # forwards, and the roles are synced after it

    from django.contrib.auth.models import Group, User

    def groups(name: str) -> list[str]:
        return sorted(User.objects.get(username=name).groups.values_list("name", flat=True))

    assert groups(plain.username) == ["operator"] and groups(seer.username) == ["reviewer"]
    assert groups(root.username) == []  # a superuser may do everything anyway
    operator = User.objects.get(username=plain.username)
    assert operator.has_perm("relay.change_series") and not operator.has_perm("relay.discard_image")
    for role, names in ROLES.items():
        held = {f"{p.content_type.app_label}.{p.codename}" for p in Group.objects.get(name=role).permissions.all()}
        assert held == set(names), role
