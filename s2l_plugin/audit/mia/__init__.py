"""Membership-inference attacks (one module each) and the engine that runs them.

Built-in attacks, registered through ``register_attacks`` (this module is a DEFAULT_PLUGINS entry):
``loss``, ``secmi``, ``pia``, ``pian``, ``reference`` and the opt-in ``clid``. Each returns one score per image, higher =
more likely a member, and never thresholds; metrics live in :mod:`s2l_plugin.audit.metrics`.

Public API: :func:`audit_membership` (:func:`s2l_plugin.audit.compare.compare_attack` pairs two of its results into a before / after ΔAUC),
:func:`from_testbed`. Importing this module imports no torch.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from s2l_plugin.audit.mia.clid import CLiDAttack
from s2l_plugin.audit.mia.data import MembershipSets, from_testbed
from s2l_plugin.audit.mia.engine import MIAttack, audit_membership
from s2l_plugin.audit.mia.loss import LossAttack
from s2l_plugin.audit.mia.pia import PIAAttack
from s2l_plugin.audit.mia.reference import ReferenceAttack
from s2l_plugin.audit.mia.secmi import SecMIAttack
from s2l_plugin.config import DEFAULT_ATTACKS
from s2l_plugin.hooks import hookimpl

__all__ = [
    "DEFAULT_ATTACKS",
    "CLiDAttack",
    "LossAttack",
    "MIAttack",
    "MembershipSets",
    "PIAAttack",
    "ReferenceAttack",
    "SecMIAttack",
    "audit_membership",
    "builtin_attacks",
    "from_testbed",
]


def builtin_attacks() -> list[Any]:
    """Fresh instances of every built-in attack with its default parameters."""
    return [LossAttack(), SecMIAttack(), PIAAttack(), PIAAttack(normalize=True), ReferenceAttack(), CLiDAttack()]


@hookimpl
def register_attacks(register: Callable[[Any], None]) -> None:
    for attack in builtin_attacks():
        register(attack)
