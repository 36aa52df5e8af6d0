"""flyfn's AppConfig: loads settings-declared views into the registry, registers the checks."""

from __future__ import annotations

from typing import Any

from django.apps import AppConfig
from django.core.signals import setting_changed

from flyfn.conf import SEED_SETTING, SettingsError, get_settings, reset_settings
from flyfn.registry import registry

__all__ = ["FlyfnConfig", "load_declared_views"]


def load_declared_views() -> None:
    """Put the views declared in settings (by url name) into the registry.

    Invalid settings leave no declared views: `manage.py check` reports them (flyfn.E001-E003).
    The url names are resolved to view callbacks lazily, at the first lookup needing it, never here:
    importing ROOT_URLCONF inside `ready()` would, for instance, freeze `admin.site.urls` before
    the admin's own `ready()` has discovered the ModelAdmins.
    """
    try:
        registry.set_declared(get_settings().declared_views)
    except SettingsError:
        registry.set_declared({})


def _on_setting_changed(*, setting: str, **kwargs: Any) -> None:
    if setting in {"FLYFN", SEED_SETTING}:
        reset_settings()  # do not depend on the order in which receivers run
        load_declared_views()
    elif setting == "ROOT_URLCONF":
        registry.forget_urls()


class FlyfnConfig(AppConfig):
    """`"flyfn"` in INSTALLED_APPS."""

    name = "flyfn"
    verbose_name = "flyfn"

    def ready(self) -> None:
        from flyfn import checks  # noqa: F401  (registers the system checks)

        load_declared_views()
        setting_changed.connect(_on_setting_changed, dispatch_uid="flyfn.apps.declared_views")
