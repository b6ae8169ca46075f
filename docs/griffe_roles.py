"""A griffe extension: Sphinx roles in docstrings become mkdocstrings cross-references.

The package's docstrings cite other names Sphinx-style (``:class:`~aace.sam.SAM```,
``:meth:`reset_stats```); Markdown has no such roles. Each role naming an object of the package
(absolute, or relative to the documented object, its class or its module) becomes a link to that
object's API entry; one naming another library (``torch``) becomes inline code. A role naming
an ``aace`` object that does not exist is a warning, so ``mkdocs build --strict`` fails on it.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_ROLE = re.compile(
    r":(?:py:)?(?:class|func|meth|mod|attr|data|obj|exc):`(?P<tilde>~?)(?P<name>[^`]+)`"
)
_LITERAL = re.compile(r"(\S)::\n")
logger = griffe.logger


def _resolve(package: griffe.Module, name: str) -> griffe.Object | griffe.Alias | None:
    parts = name.split(".")
    if parts[0] != package.name:
        return None
    try:
        return package[".".join(parts[1:])] if len(parts) > 1 else package
    except (KeyError, griffe.AliasResolutionError, griffe.CyclicAliasError):
        return None


def _candidates(obj: griffe.Object, name: str) -> list[str]:
    scopes = [obj, obj.parent, obj.module]
    return [name] + [f"{scope.path}.{name}" for scope in scopes if scope is not None]


class SphinxRoles(griffe.Extension):
    """Rewrite the roles of every docstring of the package once it is loaded."""

    def on_package(self, *, pkg: griffe.Module, **kwargs: Any) -> None:
        self._walk(pkg, pkg)

    def _walk(self, package: griffe.Module, obj: griffe.Object) -> None:
        if obj.docstring is not None:
            # reST's "text::" before a literal block reads "text:" in Markdown, where the
            # indented block is a code block already.
            obj.docstring.value = _LITERAL.sub(r"\1:\n", obj.docstring.value)
            obj.docstring.value = _ROLE.sub(
                lambda m: self._link(package, obj, m), obj.docstring.value
            )
        for member in obj.members.values():
            if not member.is_alias:
                self._walk(package, member)

    def _link(self, package: griffe.Module, obj: griffe.Object, match: re.Match[str]) -> str:
        name = match.group("name").strip()
        shown = name.split(".")[-1] if match.group("tilde") else name
        for candidate in _candidates(obj, name):
            target = _resolve(package, candidate)
            if target is not None:
                if target.is_alias:
                    target = target.final_target
                return f"[`{shown}`][{target.path}]"
        if name.split(".")[0] == package.name:
            logger.warning(f"{obj.path}: docstring role names {name!r}, which does not exist")
        return f"`{shown}`"
