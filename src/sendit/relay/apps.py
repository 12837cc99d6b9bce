from django.apps import AppConfig


class RelayConfig(AppConfig):
    name = "sendit.relay"
    label = "relay"
    verbose_name = "Sendit relay"
