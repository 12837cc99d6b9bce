"""Accounts made before roles existed could retry, release and discard: they become operators
(discard now needs the reviewer role), and those allowed to see identifier responses reviewers."""

from django.db import migrations


def forwards(apps, schema_editor):
    User = apps.get_model("auth", "User")
    Group = apps.get_model("auth", "Group")
    operator, _ = Group.objects.get_or_create(name="operator")
    reviewer, _ = Group.objects.get_or_create(name="reviewer")
    for user in User.objects.filter(is_superuser=False, groups__isnull=True):
        sees = user.user_permissions.filter(codename="view_identifier_response").exists()
        user.groups.add(reviewer if sees else operator)


class Migration(migrations.Migration):
    dependencies = [
        ("relay", "0008_review_roles_blanking"),
        ("auth", "0012_alter_user_first_name_max_length"),
    ]

    operations = [migrations.RunPython(forwards, migrations.RunPython.noop)]
