"""flyfn's AppConfig: loads settings-declared views into the registry, registers the checks."""

from __future__ import annotations

from django.apps import AppConfig

from flyfn import process_state
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


def _reload_declared_views() -> None:
    reset_settings()  # do not depend on the order in which the pieces were registered
    load_declared_views()


class FlyfnConfig(AppConfig):
    """`"flyfn"` in INSTALLED_APPS."""

    name = "flyfn"
    verbose_name = "flyfn"

    def ready(self) -> None:
        from flyfn import checks  # noqa: F401  (registers the system checks)

        load_declared_views()
        # Reset from here on only (flyfn.conf's receiver runs the settings resets).
        process_state.register(
            __name__,
            "declared views in the registry",
            settings=_reload_declared_views,
            watched={"FLYFN", SEED_SETTING},
        )
        process_state.register(
            __name__,
            "url names resolved by the registry",
            settings=registry.forget_urls,
            watched={"ROOT_URLCONF"},
        )
