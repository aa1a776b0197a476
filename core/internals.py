"""Checks that a framework's private members a plugin relies on still exist (no framework here).

Each plugin's `compat` module lists the members it uses in a table of `Internal`s and calls
`check` at import, so a framework release that renamed one fails at once with an `ImportError`
naming the member and the installed version, instead of the plugin failing mid-call or quietly
losing a feature (an override that is no longer called).
"""

from __future__ import annotations

import contextvars
import inspect
import types
from collections.abc import Iterable
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from typing import Any


@dataclass(frozen=True, slots=True)
class Internal:
    """One underscore-named framework member a plugin uses.

    owner: the module or class that holds it.
    kind: "context variable", "class", "method", "property", "init attribute" (an instance
        attribute `owner.__init__` assigns; checked in its code, since no instance exists at
        import), "nested coroutine" (a coroutine function defined inside the method `inside`,
        recognised by its name at run time) or "subclass API" (underscore-named, but documented
        by the framework for plugins to override or use).
    params: for a method the plugin overrides or calls, the leading parameters (after self) it
        relies on, in order.
    """

    owner: Any
    name: str
    kind: str
    used_in: str
    why: str
    params: tuple[str, ...] = ()
    inside: str | None = None

    @property
    def qualname(self) -> str:
        owner = getattr(self.owner, "__qualname__", None)
        where = f"{self.owner.__module__}.{owner}" if owner else self.owner.__name__
        if self.inside:
            where = f"{where}.{self.inside}.<locals>"
        return f"{where}.{self.name}"


_KINDS: dict[str, type | tuple[type, ...]] = {
    "context variable": contextvars.ContextVar,
    "class": type,
    "property": property,
    "method": types.FunctionType,
}


def installed_version(distribution: str) -> str:
    try:
        return version(distribution)
    except PackageNotFoundError:  # pragma: no cover - a source checkout of the framework
        return "unknown"


def problem(item: Internal) -> str | None:
    """What is wrong with `item` on the installed framework, or None when it is usable."""
    if item.kind == "init attribute":
        init = getattr(item.owner.__init__, "__code__", None)
        if init is not None and item.name in init.co_names:
            return None
        return f"{item.qualname} is no longer assigned by {item.owner.__qualname__}.__init__"
    if item.kind == "nested coroutine":
        method = item.owner.__dict__.get(item.inside) if item.inside else None
        code = getattr(method, "__code__", None)
        if code is not None and _nested_code(code, item.name):
            return None
        return f"{item.qualname} does not exist"
    if isinstance(item.owner, type):  # the raw attribute: a property or function, unbound
        member = next(
            (c.__dict__[item.name] for c in item.owner.__mro__ if item.name in c.__dict__), None
        )
    else:
        member = getattr(item.owner, item.name, None)
    if member is None:
        return f"{item.qualname} does not exist"
    expected = _KINDS.get(item.kind)
    if expected is not None and not isinstance(member, expected):
        return f"{item.qualname} is no longer a {item.kind}"
    if item.params:
        func = member.fget if isinstance(member, property) else member
        try:
            names = list(inspect.signature(func).parameters)[1:]  # after self
        except (TypeError, ValueError):
            return f"{item.qualname} is no longer a function"
        if tuple(names[: len(item.params)]) != item.params:
            return (f"{item.qualname} takes ({', '.join(names)}); the plugin relies on "
                    f"({', '.join(item.params)})")
    return None


def check(internals: Iterable[Internal], *, plugin: str, distribution: str,
          tested_range: str, error: type[ImportError]) -> None:
    """Raise `error` naming every internal missing on the installed `distribution`."""
    problems = [p for p in map(problem, internals) if p is not None]
    if problems:
        raise error(
            f"{plugin} cannot run on {distribution} {installed_version(distribution)}: "
            + "; ".join(problems)
            + f". It is tested with {distribution}{tested_range}; install a release in that "
            f"range (see {plugin}/compat.py for what each member is used for)."
        )


def _nested_code(code: types.CodeType, name: str) -> bool:
    for const in code.co_consts:
        if isinstance(const, types.CodeType) and (
            const.co_name == name or _nested_code(const, name)
        ):
            return True
    return False
