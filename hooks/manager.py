"""The plugin manager: built-in plugins, third-party entry points, ``S2L_PLUGINS`` and registries.

Built-in features are plugins themselves (``DEFAULT_PLUGINS``), registered through the same
hooks as third-party code. A fresh manager is cheap; nothing here is global except the lazily
built default returned by :func:`get_plugin_manager` (tests reset it with
:func:`reset_plugin_manager`).
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import pluggy

from s2l_plugin.errors import PluginError

from . import specs

ENV_PLUGINS = "S2L_PLUGINS"

# Built-in plugins, imported by module path. Each module is light at import time (no torch).
DEFAULT_PLUGINS: tuple[str, ...] = (
    "s2l_plugin.integration",
    "s2l_plugin.generate",
    "s2l_plugin.audit.mia",
    "s2l_plugin.audit.extraction",
    "s2l_plugin.report.writers",
    "s2l_plugin.adapters.dreambooth",
    "s2l_plugin.adapters.lora",
    "s2l_plugin.adapters.textual_inversion",
    "s2l_plugin.adapters.hypernetwork",
    "s2l_plugin.adapters.pivotal",
    "s2l_plugin.formats.loaders",
    "s2l_plugin.audit.api",
)


@dataclass(frozen=True)
class RegistrySpec:
    """What a register-callback hook collects and which attributes every registered object needs.

    ``contract``, when set, is the ``"module:function"`` path of the extension point's full check:
    called with each registered object, it returns what breaks the contract (a short phrase) or
    None. Imported on first use, so this module stays light.
    """

    hook: str
    kind: str
    required: tuple[str, ...]
    contract: str = ""


# One contract per extension point, each stated where the package calls it (docs/hooks.md restates them):
# the Adapter ABC (adapters/base.py), the Attack protocol (audit/mia/engine.py), the Extractor
# protocol (audit/extractor.py), the Loader protocol (formats/loaders.py) and the ReportWriter
# protocol (report/writers.py). tests/test_contracts.py and tests/test_attack_contract.py check every
# registered object against them.
REGISTRIES: dict[str, RegistrySpec] = {
    "adapters": RegistrySpec(
        "register_adapters", "adapter", ("name", "train", "load", "script_args", "detect"), "s2l_plugin.adapters.base:adapter_problem"
    ),
    # An attack has `score` or `score_encoded` (or both) and may declare needs_reference (a bool).
    "attacks": RegistrySpec("register_attacks", "attack", ("name",), "s2l_plugin.audit.mia.engine:attack_problem"),
    "extractors": RegistrySpec("register_extractors", "extractor", ("name", "extract"), "s2l_plugin.audit.extractor:extractor_problem"),
    "loaders": RegistrySpec("register_loaders", "loader", ("name", "sniff", "load"), "s2l_plugin.formats.loaders:loader_problem"),
    "report_writers": RegistrySpec(
        "register_report_writers", "report writer", ("name", "write"), "s2l_plugin.report.writers:report_writer_problem"
    ),
}


def call_problem(obj: Any, member: str, args: tuple[str, ...], keywords: tuple[str, ...] = ()) -> str | None:
    """What keeps the package from calling ``obj.member(*args, **keywords)`` (one short phrase), or None.

    ``args`` and ``keywords`` are the parameter names the package passes (positionally and by keyword);
    a contract's ``*_problem`` function uses this for each method it calls. A callable without a
    signature (a builtin) is taken as it is.
    """
    import inspect

    fn = getattr(obj, member, None)
    if fn is None:
        return f"missing {member}"
    if not callable(fn):
        return f"{member} is not callable"
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):
        return None
    try:
        signature.bind(*args, **{k: k for k in keywords})
    except TypeError as exc:
        shown = ", ".join([*args, *(f"{k}=..." for k in keywords)])
        return f"{member} cannot be called as {member}({shown}): {exc}"
    return None


def _allowed_plugins() -> set[str] | None:
    """Names allowed by ``S2L_PLUGINS`` (None when the variable is unset: load all)."""
    raw = os.environ.get(ENV_PLUGINS)
    if raw is None:
        return None
    return {name.strip() for name in raw.split(",") if name.strip()}


class S2LPluginManager(pluggy.PluginManager):
    """A pluggy PluginManager that remembers which distribution each entry-point plugin came from."""

    def __init__(self) -> None:
        super().__init__(specs.PROJECT)
        self.distributions: dict[str, Any] = {}


def _load_entry_points(pm: S2LPluginManager, allowed: set[str] | None) -> None:
    from importlib.metadata import entry_points

    for ep in entry_points(group=specs.ENTRY_POINT_GROUP):
        dist_name = ep.dist.name if ep.dist is not None else ""
        if allowed is not None and ep.name not in allowed and dist_name not in allowed:
            continue
        if pm.get_plugin(ep.name) is not None or pm.is_blocked(ep.name):
            continue
        try:
            plugin = ep.load()
        except Exception as exc:  # a broken third-party plugin must say who it is
            raise PluginError(
                f"plugin {ep.name!r} (entry point {ep.value!r} of {dist_name or 'unknown distribution'}) "
                f"failed to import: {exc}"
            ) from exc
        pm.register(plugin, name=ep.name)
        pm.distributions[ep.name] = ep.dist


def make_plugin_manager(
    *, load_entry_points: bool = True, extra_plugins: Iterable[Any] = ()
) -> S2LPluginManager:
    """Build a new PluginManager with the built-in plugins, entry-point plugins and ``extra_plugins``.

    ``S2L_PLUGINS`` limits which entry-point plugins load: unset = all, empty = none,
    ``a,b`` = only those entry-point or distribution names. ``check_pending()`` runs last, so
    a hookimpl whose name matches no hook fails loudly, naming the plugin.
    """
    pm = S2LPluginManager()
    pm.add_hookspecs(specs)
    for module_name in DEFAULT_PLUGINS:
        pm.register(importlib.import_module(module_name), name=module_name)
    if load_entry_points:
        _load_entry_points(pm, _allowed_plugins())
    for plugin in extra_plugins:
        pm.register(plugin)
    try:
        pm.check_pending()
    except pluggy.PluginValidationError as exc:
        raise PluginError(f"plugin {pm.get_name(exc.plugin)!r}: {exc}") from exc
    return pm


_default_pm: pluggy.PluginManager | None = None


def get_plugin_manager() -> pluggy.PluginManager:
    """The process-wide manager, built on first use."""
    global _default_pm
    if _default_pm is None:
        _default_pm = make_plugin_manager()
    return _default_pm


def reset_plugin_manager(pm: pluggy.PluginManager | None = None) -> None:
    """Drop (or replace) the process-wide manager; tests call this so no plugin leaks between them."""
    global _default_pm
    _default_pm = pm


def collect(registry: str, pm: pluggy.PluginManager | None = None) -> dict[str, Any]:
    """Call a register-callback hook and return ``{name: object}``, validated.

    Raises PluginError naming the plugin, the hook and the rule when a plugin registers an
    object without the required attributes, one that breaks the registry's ``contract``, or a
    name another plugin already took.
    """
    spec = REGISTRIES[registry]
    pm = pm or get_plugin_manager()
    found: dict[str, Any] = {}
    owners: dict[str, str] = {}
    hook = getattr(pm.hook, spec.hook)
    contract = _contract(spec)
    # Call implementations one by one (reverse of pluggy's LIFO order, so built-ins register
    # first) to know which plugin registered what.
    for impl in hook.get_hookimpls():
        plugin_name = impl.plugin_name

        def register(obj: Any, _plugin: str = plugin_name) -> None:
            missing = [attr for attr in spec.required if not hasattr(obj, attr)]
            if missing:
                raise PluginError(
                    f"plugin {_plugin!r}, hook {spec.hook}: registered {obj!r} is not a {spec.kind} "
                    f"(missing {', '.join(missing)})"
                )
            name = obj.name
            if not isinstance(name, str) or not name:
                raise PluginError(f"plugin {_plugin!r}, hook {spec.hook}: {spec.kind} name must be a non-empty string, got {name!r}")
            problem = contract(obj) if contract is not None else None
            if problem:
                raise PluginError(f"plugin {_plugin!r}, hook {spec.hook}: registered {obj!r} is not a {spec.kind} ({problem})")
            if name in found:
                raise PluginError(
                    f"plugin {_plugin!r}, hook {spec.hook}: {spec.kind} name {name!r} is already registered by plugin {owners[name]!r}"
                )
            found[name] = obj
            owners[name] = _plugin

        kwargs = {"register": register}
        impl.function(**{k: v for k, v in kwargs.items() if k in impl.argnames})
    return found


def _contract(spec: RegistrySpec) -> Any:
    """The function ``spec.contract`` names (None when the spec has none)."""
    if not spec.contract:
        return None
    module, _, function = spec.contract.partition(":")
    return getattr(importlib.import_module(module), function)


def get(registry: str, name: str, pm: pluggy.PluginManager | None = None) -> Any:
    """One registered object by name; ConfigError listing the choices when unknown."""
    from s2l_plugin.errors import ConfigError

    items = collect(registry, pm)
    if name not in items:
        kind = REGISTRIES[registry].kind
        raise ConfigError(f"unknown {kind} {name!r}; expected one of: {', '.join(sorted(items)) or '(none registered)'}")
    return items[name]


def plugin_table(pm: pluggy.PluginManager | None = None) -> list[dict[str, Any]]:
    """Registered plugins with their hooks, built-in flag and distribution version (for ``s2l plugins``)."""
    pm = pm or get_plugin_manager()
    dists = getattr(pm, "distributions", {})
    rows = []
    for name, plugin in sorted(pm.list_name_plugin(), key=lambda item: item[0]):
        if plugin is None:
            continue
        hooks = sorted(caller.name for caller in (pm.get_hookcallers(plugin) or []))
        dist = dists.get(name)
        rows.append(
            {
                "name": name,
                "builtin": name in DEFAULT_PLUGINS,
                "hooks": hooks,
                "distribution": dist.metadata["Name"] if dist is not None else None,
                "version": dist.version if dist is not None else None,
            }
        )
    return rows
