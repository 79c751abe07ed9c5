"""A tenant's custom CSS, parsed with tinycss2 and held to an allow-list.

The sheet is read by a real CSS parser (CSS Syntax Level 3, as browsers read it) and every
token is judged by what it decodes to, so an escape (``\\40 import``, ``u\\72l(``) spells
nothing the rules do not see. What is allowed is listed, never what is not:

- plain qualified rules: selectors of element, class, id and attribute names (attribute
  matches ``=``, ``~=`` and ``|=`` only: prefix and substring matches read values out),
  combinators, and the pseudo-classes and pseudo-elements in ``PSEUDO_CLASSES`` and
  ``PSEUDO_FUNCTIONS``; no nesting, no at-rules at all (``@import``, ``@font-face``,
  ``@namespace``, ``@media``...);
- properties in ``PROPERTIES`` (colours, backgrounds, fonts, borders, outlines, radius,
  spacing, text, shadows) and custom properties (``--name``), whose values hold only
  idents, numbers, colours, the functions in ``FUNCTIONS`` and ``url()`` of an
  ``https://`` address on the host of the tenant's ``logo_url``; strings only as font
  names, and font families only from ``SAFE_FONTS``;
- nowhere a ``<`` (it could end the page's ``<style>``), a control character, or more than
  ``MAX_BYTES`` of UTF-8 or ``MAX_RULES`` rules.

On write a sheet that breaks a rule is refused, naming the line and column of the first
problem (``problem``); a sheet that passes is stored as written. On read the stored sheet
is sanitized again (``sanitized``): only the rules and declarations that pass, serialized
by tinycss2 (comments dropped), so rows stored under older rules are safe too.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any
from urllib.parse import urlsplit

import tinycss2
from tinycss2 import ast

from .css_allow_list import (
    ATTRIBUTE_MATCHES,
    CSS_WIDE_KEYWORDS,
    FONT_KEYWORDS,
    FUNCTIONS,
    PROPERTIES,
    PSEUDO_CLASSES,
    PSEUDO_FUNCTIONS,
    SAFE_FONTS,
    SECRET_ATTRIBUTES,
    SELECTOR_LITERALS,
    VALUE_LITERALS,
)

log = logging.getLogger("towerco.custom_css")

MAX_BYTES = 16 * 1024
MAX_RULES = 200
#: Deepest nesting of functions and brackets in a selector or value (calc(min(...))).
MAX_DEPTH = 8

NAME = re.compile(r"-{0,2}[A-Za-z_][A-Za-z0-9_-]*")
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0e-\x1f\x7f]")
_HEX_COLOR = re.compile(r"[0-9A-Fa-f]{3,4}|[0-9A-Fa-f]{6}|[0-9A-Fa-f]{8}")
#: Words that load or run code, named when met (their own checks refuse them anyway).
_DANGEROUS = (
    ("expression", "it runs script in old browsers"),
    ("javascript:", "it runs script"),
    ("behavior", "it loads script in old browsers"),
    ("-moz-binding", "it loads script in old browsers"),
)


@dataclass(frozen=True)
class Problem:
    """What a sheet may not hold, and where (1-based line and column of the original)."""

    line: int
    column: int
    what: str

    def __str__(self) -> str:
        return f"line {self.line}, column {self.column}: {self.what}"


class _NotAllowedError(Exception):
    def __init__(self, node: Any, what: str) -> None:
        super().__init__(what)
        self.problem = Problem(node.source_line or 1, node.source_column or 1, what)


def problem(css: str, logo_url: str | None) -> str | None:
    """Why ``css`` may not be stored, naming where, or None.

    ``logo_url`` is the tenant's logo (``url()`` may name only its https host); None when
    it is not known yet (an update's first check, before the stored settings are read):
    then any ``https://`` url() passes, and the check with the stored logo judges it.
    """
    found = list(_raw_problems(css))
    sheet = _Sheet(logo_url)
    if not found:
        sheet.walk(css)
        found = sheet.problems
    if not found:
        return None
    more = f" (and {len(found) - 1} more)" if len(found) > 1 else ""
    return f"{found[0]}{more}"


@lru_cache(maxsize=512)
def sanitized(css: str, logo_url: str) -> str:
    """What of a stored sheet may be served: the rules and declarations that pass, serialized.

    Cached per sheet and logo: GetBranding answers often and the stored sheets are few. A
    sheet stored under older rules (or a logo moved to another host) is logged once per
    process, so an operator learns that part of a tenant's theme is not shown.
    """
    if not css:
        return ""
    sheet = _Sheet(logo_url)
    kept = "\n".join(sheet.walk(css)) if len(css.encode()) <= MAX_BYTES else ""
    found = sheet.problems or list(_raw_problems(css))
    if found:
        log.warning(
            "a stored custom CSS sheet breaks the rules; served without it: %s (%d in all)", found[0], len(found)
        )
    return kept


def _raw_problems(css: str) -> Iterator[Problem]:
    """Rules on the text as written, comments included (the parser skips those)."""
    size = len(css.encode())
    if size > MAX_BYTES:
        at = len(css.encode()[:MAX_BYTES].decode(errors="ignore"))
        line, column = _position(css, at)
        yield Problem(line, column, f"the sheet is {size} bytes of UTF-8; at most {MAX_BYTES // 1024} KiB are allowed")
        return
    for pattern, what in _RAW_RULES:
        match = pattern.search(css)
        if match:
            yield Problem(*_position(css, match.start()), what)


def _served_rule(rule: ast.QualifiedRule, body: list[str]) -> str:
    """A rule as served; never with a '<' (an escape decoded into a string would be written raw)."""
    text = f"{tinycss2.serialize(rule.prelude).strip()} {{ {'; '.join(body)} }}"
    for pattern, what in _RAW_RULES:
        if pattern.search(text):
            raise _NotAllowedError(rule, what)
    return text


def _position(css: str, index: int) -> tuple[int, int]:
    line = css.count("\n", 0, index) + 1
    return line, index - (css.rfind("\n", 0, index) + 1) + 1


class _Sheet:
    """One walk over a sheet: what passes (serialized) and what does not (problems)."""

    def __init__(self, logo_url: str | None) -> None:
        self.logo = _logo_origin(logo_url)
        self.problems: list[Problem] = []

    def walk(self, css: str) -> list[str]:
        kept: list[str] = []
        rules = 0
        for node in tinycss2.parse_stylesheet(css, skip_comments=True, skip_whitespace=True):
            try:
                if isinstance(node, ast.QualifiedRule):
                    rules += 1
                    if rules > MAX_RULES:
                        raise _NotAllowedError(node, f"more than {MAX_RULES} rules are not allowed")
                    self._selector(node.prelude)
                    body = self._declarations(node)
                    if body:
                        kept.append(_served_rule(node, body))
                else:
                    raise _NotAllowedError(node, _not_a_rule(node))
            except _NotAllowedError as refused:
                self.problems.append(refused.problem)
        return kept

    def _declarations(self, rule: ast.QualifiedRule) -> list[str]:
        body: list[str] = []
        for node in tinycss2.parse_blocks_contents(rule.content, skip_comments=True, skip_whitespace=True):
            try:
                if not isinstance(node, ast.Declaration):
                    raise _NotAllowedError(node, _not_a_declaration(node))
                self._declaration(node)
                body.append(node.serialize().strip())
            except _NotAllowedError as refused:
                self.problems.append(refused.problem)
        return body

    def _declaration(self, node: ast.Declaration) -> None:
        name = node.lower_name
        if not NAME.fullmatch(name):
            raise _NotAllowedError(node, f"{_shown(name)} is not a property name")
        if not name.startswith("--") and name not in PROPERTIES:
            raise _NotAllowedError(node, f"property {_shown(name)} is not allowed{_danger(name)}; {_PROPERTY_HINT}")
        if name in ("font", "font-family"):
            self._fonts(node, node.value, shorthand=name == "font")
        else:
            self._strings(node.value)
        self._value(node.value, depth=0)

    # Values

    def _value(self, tokens: Iterable[Any], depth: int) -> None:
        if depth > MAX_DEPTH:
            raise _NotAllowedError(
                next(iter(tokens), None) or _NOWHERE, f"values nested deeper than {MAX_DEPTH} are not allowed"
            )
        for token in tokens:
            kind = token.type
            if kind in ("whitespace", "comment", "number", "percentage"):
                continue
            if kind == "dimension":
                _name(token, token.unit, "unit")
            elif kind == "ident":
                _name(token, token.value, "word")
            elif kind == "hash":
                if not _HEX_COLOR.fullmatch(token.value):
                    raise _NotAllowedError(token, f"#{_shown(token.value)} is not a colour (#RGB, #RRGGBB, with alpha)")
            elif kind == "string":
                continue  # judged by _fonts where allowed; _strings refuses the rest
            elif kind == "literal":
                if token.value not in VALUE_LITERALS:
                    raise _NotAllowedError(token, f"{_shown(token.value)} is not allowed in a value")
            elif kind == "url":
                self._url(token, token.value)
            elif kind == "function":
                self._function(token, depth)
            elif kind == "() block":
                self._value(token.content, depth + 1)
            elif kind == "error":
                raise _NotAllowedError(token, f"this is not valid CSS ({token.message})")
            else:
                raise _NotAllowedError(token, f"{_describe(token)} is not allowed in a value")

    def _function(self, token: ast.FunctionBlock, depth: int) -> None:
        name = token.lower_name
        if name == "url":
            args = [t for t in token.arguments if t.type not in ("whitespace", "comment")]
            if len(args) != 1 or args[0].type != "string":
                raise _NotAllowedError(token, "url() must hold one address")
            self._url(token, args[0].value)
            return
        if name not in FUNCTIONS:
            raise _NotAllowedError(token, f"{_shown(name)}() is not allowed{_danger(name)}; {_FUNCTION_HINT}")
        self._strings(token.arguments)
        self._value(token.arguments, depth + 1)

    def _url(self, token: Any, address: str) -> None:
        bare = address.strip()
        _plain_text(token, bare)
        if self.logo == "":
            raise _NotAllowedError(token, f"{_URL_HINT}, and no logo_url is set")
        if "javascript:" in bare.lower().replace(" ", ""):
            raise _NotAllowedError(token, "javascript: URLs are not allowed (they run script)")
        if not bare or _CONTROL.search(bare) or any(c.isspace() or c in "\\\"'" for c in bare):
            raise _NotAllowedError(token, "url() must be a plain https:// address")
        try:
            parts = urlsplit(bare)
            origin = (parts.scheme.lower(), (parts.hostname or "").lower(), parts.port)
        except ValueError:
            raise _NotAllowedError(token, "url() must be a plain https:// address") from None
        if parts.scheme.lower() != "https" or parts.username is not None or parts.password is not None:
            raise _NotAllowedError(token, f"url({_shown(bare)}) is not allowed: only https:// on the host of logo_url")
        if self.logo is not None and origin != self.logo:
            raise _NotAllowedError(
                token, f"url({_shown(bare)}) is not allowed: only https://{self.logo[1]} (logo_url's host)"
            )

    def _fonts(self, node: Any, tokens: Sequence[Any], *, shorthand: bool) -> None:
        """Every family named is a safe one; in ``font``, idents other than keywords are family words."""
        for family, at in _families(tokens, shorthand):
            if family.lower() not in SAFE_FONTS:
                raise _NotAllowedError(at or node, f"font family {_shown(family)} is not allowed; {_FONT_HINT}")

    def _strings(self, tokens: Iterable[Any]) -> None:
        for token in tokens:
            if token.type == "string":
                raise _NotAllowedError(token, "strings are allowed only as font family names")

    # Selectors

    def _selector(self, prelude: Sequence[Any], depth: int = 0) -> None:
        if depth > MAX_DEPTH:
            raise _NotAllowedError(prelude[0], f"selectors nested deeper than {MAX_DEPTH} are not allowed")
        tokens = [t for t in prelude if t.type != "comment"]
        if not any(t.type != "whitespace" for t in tokens):
            raise _NotAllowedError(prelude[0] if prelude else _NOWHERE, "a rule needs a selector")
        colons = 0
        for token in tokens:
            kind = token.type
            if kind == "literal" and token.value == ":":
                colons += 1
                if colons > 2:
                    raise _NotAllowedError(token, "':::' is not a selector")
                continue
            if colons:
                self._pseudo(token, depth)
                colons = 0
            elif kind == "whitespace":
                continue
            elif kind == "ident":
                _name(token, token.value, "selector name")
            elif kind == "hash":
                if not token.is_identifier:
                    raise _NotAllowedError(token, f"#{_shown(token.value)} is not an id selector")
                _name(token, token.value, "id")
            elif kind == "literal" and token.value in SELECTOR_LITERALS:
                continue
            elif kind == "[] block":
                self._attribute(token)
            else:
                raise _NotAllowedError(token, f"{_describe(token)} is not allowed in a selector")
        if colons:
            raise _NotAllowedError(tokens[-1], "a ':' must be followed by a pseudo-class")

    def _pseudo(self, token: Any, depth: int) -> None:
        if token.type == "ident" and token.lower_value in PSEUDO_CLASSES:
            return
        if token.type == "function" and token.lower_name in PSEUDO_FUNCTIONS:
            if token.lower_name.startswith("nth-"):
                for part in token.arguments:
                    if part.type not in ("whitespace", "number", "dimension", "ident", "literal"):
                        raise _NotAllowedError(part, f"{_describe(part)} is not allowed in :{token.lower_name}()")
                    if part.type in ("ident", "dimension"):
                        _name(part, part.value if part.type == "ident" else part.unit, "nth step")
                    if part.type == "literal" and part.value not in ("+", "-"):
                        raise _NotAllowedError(part, f"{_shown(part.value)} is not allowed in :{token.lower_name}()")
                return
            self._selector(token.arguments, depth + 1)
            return
        name = token.lower_value if token.type == "ident" else getattr(token, "lower_name", token.type)
        raise _NotAllowedError(token, f"pseudo-class :{_shown(str(name))} is not allowed")

    def _attribute(self, block: ast.SquareBracketsBlock) -> None:
        parts = [t for t in block.content if t.type not in ("whitespace", "comment")]
        if not parts or parts[0].type != "ident":
            raise _NotAllowedError(block, "an attribute selector must start with an attribute name")
        name = parts[0].lower_value
        _name(parts[0], name, "attribute name")
        if name in SECRET_ATTRIBUTES:
            raise _NotAllowedError(parts[0], f"selectors may not test [{name}]: it holds what users type")
        rest = parts[1:]
        if not rest:
            return
        match, rest = _attribute_match(rest)
        if match not in ATTRIBUTE_MATCHES:
            raise _NotAllowedError(block, f"attribute match {_shown(match)} is not allowed; {_MATCH_HINT}")
        if not rest or rest[0].type not in ("ident", "string") or len(rest) > 2:
            raise _NotAllowedError(block, "an attribute match needs one value")
        if len(rest) == 2 and (rest[1].type != "ident" or rest[1].lower_value not in ("i", "s")):
            raise _NotAllowedError(rest[1], "only the flags i and s may follow an attribute value")
        if rest[0].type == "ident":
            _name(rest[0], rest[0].value, "attribute value")
        else:
            _plain_text(rest[0], rest[0].value)


class _Nowhere:
    source_line = 1
    source_column = 1


_NOWHERE = _Nowhere()
_PROPERTY_HINT = "allowed: colours, backgrounds, fonts, borders, outlines, radius, spacing, text and shadows"
_FUNCTION_HINT = "functions: colours, gradients, var(), calc(), min(), max(), clamp() and url() of the logo's host"
_URL_HINT = "url() is allowed only for https:// images on the host of logo_url"
_FONT_HINT = "use a system font (e.g. Arial, Roboto, Segoe UI, Georgia) or a generic family such as sans-serif"
_MATCH_HINT = "only =, ~= and |= (prefix and substring matches can read values out)"
_RAW_RULES = (
    (re.compile("<"), "'<' is not allowed (it could end the page's <style>)"),
    (_CONTROL, "control characters are not allowed"),
)


def _logo_origin(logo_url: str | None) -> tuple[str, str, int | None] | str | None:
    """(scheme, host, port) of the logo; "" without one; None when not known yet."""
    if logo_url is None:
        return None
    try:
        parts = urlsplit(logo_url.strip())
        if parts.scheme.lower() != "https" or not parts.hostname:
            return ""
        return ("https", parts.hostname.lower(), parts.port)
    except ValueError:
        return ""


def _families(tokens: Sequence[Any], shorthand: bool) -> Iterator[tuple[str, Any]]:
    """The family names in a font value, each with the token it starts at."""
    words: list[str] = []
    start = None
    for token in [*tokens, None]:
        keyword = (
            token is not None
            and token.type == "ident"
            and token.lower_value in (FONT_KEYWORDS if shorthand else CSS_WIDE_KEYWORDS)
        )
        is_word = token is not None and token.type == "ident" and not keyword
        if is_word:
            words.append(token.value)
            start = start or token
            continue
        if token is not None and token.type == "whitespace":
            continue
        if words:
            yield " ".join(words), start
            words, start = [], None
        if token is not None and token.type == "string":
            yield token.value, token


def _attribute_match(rest: list[Any]) -> tuple[str, list[Any]]:
    """The match operator at the start of ``rest`` (``=``, or two literals such as ``~`` ``=``)."""
    first = rest[0]
    if first.type == "literal" and first.value in ("~=", "|=", "^=", "$=", "*=", "="):
        return first.value, rest[1:]
    if first.type == "literal" and len(rest) > 1 and rest[1].type == "literal" and rest[1].value == "=":
        return first.value + "=", rest[2:]
    return _describe(first), rest[1:]


def _name(token: Any, value: str, what: str) -> None:
    """A name as it decodes: letters, digits, ``-`` and ``_`` only (escapes spell nothing else)."""
    if not NAME.fullmatch(value):
        raise _NotAllowedError(token, f"{_shown(value)} is not allowed as a {what}{_danger(value)}")


def _plain_text(token: Any, value: str) -> None:
    """A decoded string or address: no '<' and no control character, however it was escaped."""
    for pattern, what in _RAW_RULES:
        if pattern.search(value):
            raise _NotAllowedError(token, f"{what}, also when escaped")


def _danger(word: str) -> str:
    lowered = word.lower()
    return next((f" ({why})" for needle, why in _DANGEROUS if needle in lowered), "")


def _not_a_rule(node: Any) -> str:
    if isinstance(node, ast.AtRule):
        return f"{_shown('@' + node.lower_at_keyword)} is not allowed: no at-rules (@import, @font-face, @media...)"
    if isinstance(node, ast.ParseError):
        return f"this is not valid CSS ({node.message})"
    return f"{_describe(node)} is not allowed here"


def _not_a_declaration(node: Any) -> str:
    if isinstance(node, ast.AtRule):
        return f"{_shown('@' + node.lower_at_keyword)} is not allowed: no at-rules"
    if isinstance(node, ast.QualifiedRule):
        return "nested rules are not allowed"
    if isinstance(node, ast.ParseError):
        return f"this is not a declaration ({node.message})"
    return f"{_describe(node)} is not allowed here"


def _describe(token: Any) -> str:
    kind = getattr(token, "type", "token")
    if kind == "error":
        return f"invalid CSS ({token.message})"
    if kind == "function":
        return f"{_shown(token.lower_name)}()"
    if kind in ("literal", "ident", "at-keyword"):
        return _shown(("@" if kind == "at-keyword" else "") + token.value)
    return kind


def _shown(text: str) -> str:
    """A decoded name, quoted, short and printable (it goes into an error message)."""
    clean = "".join(c if c.isprintable() else "?" for c in text[:40])
    return repr(clean + ("..." if len(text) > 40 else ""))
