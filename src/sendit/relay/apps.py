from django.apps import AppConfig
from django.db.models.signals import post_migrate


class RelayConfig(AppConfig):
    name = "sendit.relay"
    label = "relay"
    verbose_name = "Sendit relay"

    def ready(self) -> None:
        from sendit.relay.roles import sync_groups

        post_migrate.connect(sync_groups, sender=self, dispatch_uid="sendit-roles")
