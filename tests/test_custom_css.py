"""A tenant's custom CSS without a server: what the allow-list refuses, where, and what it keeps.

The stack tests (tests/test_branding.py) send the same kinds of sheets through the registry.
"""

from __future__ import annotations

import logging
import random
from typing import Any

import pytest
import tinycss2

from services.tenant import custom_css

LOGO = "https://cdn.acme-towers.example/brand/logo.svg"

#: (id, sheet, the line and column named, words the reason must hold)
HOSTILE: list[tuple[str, str, str, tuple[str, ...]]] = [
    ("import", "h1 { color: red }\n@import 'https://evil.example/x.css';", "line 2, column 1", ("@import",)),
    ("import_url", "@import url(https://cdn.acme-towers.example/x.css);", "line 1, column 1", ("@import",)),
    ("import_escaped_keyword", "@\\69mport 'x.css';", "line 1, column 1", ("@import",)),
    ("import_escaped_at", "\\40 import 'x.css';", "line 1", ("not valid CSS",)),
    ("import_split_by_comment", "@IM/**/PORT 'x.css';", "line 1, column 1", ("at-rules",)),
    (
        "font_face",
        "@font-face {\n  font-family: x;\n  src: url(https://evil.example/f.woff)\n}",
        "line 1",
        ("@font-face",),
    ),
    ("namespace", "@namespace svg url(http://www.w3.org/2000/svg);", "line 1, column 1", ("@namespace",)),
    ("media", "@media print { h1 { color: red } }", "line 1, column 1", ("@media",)),
    ("remote_url", "h1 {\n  background: url(https://evil.example/x.png)\n}", "line 2, column 15", ("url(",)),
    ("protocol_relative_url", "h1 { background: url('//evil.example/x.png') }", "line 1, column 18", ("https://",)),
    ("relative_url", "h1 { background: url(/static/x.png) }", "line 1, column 18", ("https://",)),
    ("http_on_logo_host", "h1 { background: url(http://cdn.acme-towers.example/x) }", "line 1", ("https://",)),
    ("other_port", "h1 { background: url(https://cdn.acme-towers.example:8443/x) }", "line 1", ("logo_url",)),
    ("user_info", "h1 { background: url(https://u@cdn.acme-towers.example/x) }", "line 1", ("https://",)),
    ("url_escaped", "h1 { background: u\\72l(https://evil.example/x) }", "line 1, column 18", ("evil.example",)),
    ("url_escaped_spaced", "h1 { background: \\75 rl(https://evil.example) }", "line 1", ("evil.example",)),
    ("image_set", 'h1 { background: image-set("https://evil.example/x.png" 1x) }', "line 1", ("image-set",)),
    ("data_url", 'h1 { background: url("data:image/png;base64,AAAA") }', "line 1", ("https://",)),
    ("expression", "h1 {\n  color: expression(alert(1))\n}", "line 2, column 10", ("expression",)),
    ("expression_escaped", "h1 { color: \\65xpression(alert(1)) }", "line 1, column 13", ("expression", "script")),
    ("expression_escape_inside", "h1 { color: expr\\65 ssion(alert(1)) }", "line 1", ("expression",)),
    ("javascript_url", "h1 { background: url(javascript:alert(1)) }", "line 1, column 18", ("not valid CSS",)),
    ("javascript_url_quoted", "h1 { background: url('javascript:alert`1`') }", "line 1, column 18", ("javascript:",)),
    ("javascript_url_escaped", "h1 { background: url('java\\73 cript:x') }", "line 1, column 18", ("javascript:",)),
    ("end_style", "h1 { color: red }\n</style><script>alert(1)</script>", "line 2, column 1", ("'<'",)),
    ("end_style_in_comment", "h1 { color: red } /* </style> */", "line 1, column 22", ("'<'",)),
    ("end_style_escaped", "h1 { font-family: '\\3c /style>' }", "line 1", ("font family",)),
    ("end_style_escaped_in_attribute", '[data-x="\\3c /style>"] { color: red }', "line 1, column 9", ("'<'",)),
    (
        "end_style_escaped_in_url",
        'h1 { background: url("https://cdn.acme-towers.example/\\3c /style>") }',
        "line 1, column 18",
        ("'<'", "escaped"),
    ),
    ("angle_in_selector_escaped", ".\\3c script { color: red }", "line 1, column 2", ("selector",)),
    ("behavior", "h1 { behavior: url(x.htc) }", "line 1, column 6", ("behavior", "script")),
    ("behavior_escaped", "h1 { b\\65havior: url(x.htc) }", "line 1, column 6", ("behavior",)),
    ("moz_binding", "h1 { -moz-binding: url(x.xml#x) }", "line 1, column 6", ("-moz-binding",)),
    ("content", "h1::after { content: 'Call +1 555 0100 to reset your password' }", "line 1", ("content",)),
    ("position", "div { position: fixed; top: 0 }", "line 1, column 7", ("position",)),
    ("nested_rule", "h1 { color: red; span { color: blue } }", "line 1, column 18", ("nested",)),
    ("value_sniffing", "input[value^='a'] { background: red }", "line 1", ("value",)),
    ("prefix_match", "a[href^=https] { color: red }", "line 1", ("^=",)),
    ("has", "main:has(input) { color: red }", "line 1", (":'has'",)),
    ("unsafe_font", "h1 { font-family: 'Comic Sans MS' }", "line 1", ("font family",)),
    ("unsafe_font_in_shorthand", "h1 { font: 12px Papyrus, serif }", "line 1, column 17", ("Papyrus",)),
    ("custom_property_remote_url", "h1 { --bg: url(https://evil.example/x) }", "line 1", ("evil.example",)),
    ("attr", "h1 { color: attr(title) }", "line 1", ("attr",)),
    ("control_character", "h1 { color: red\x01 }", "line 1, column 16", ("control",)),
    ("oversized", "h1 { color: red }\n" + "/* padding */\n" * 1300, "line 1", ("16 KiB",)),
    ("too_many_rules", "h1 { color: red }\n" * 201, "line 201, column 1", ("200 rules",)),
    ("deep_nesting", "h1 { color: " + "calc(" * 20 + "1px" + ")" * 20 + " }", "line 1", ("nested deeper",)),
]


@pytest.mark.parametrize(("css", "where", "words"), [c[1:] for c in HOSTILE], ids=[c[0] for c in HOSTILE])
def test_a_hostile_sheet_is_refused_naming_where_and_what(css: str, where: str, words: tuple[str, ...]) -> None:
    problem = custom_css.problem(css, LOGO)
    assert problem is not None, css
    assert problem.startswith(where), problem
    for word in words:
        assert word in problem, problem
    served = custom_css.sanitized(css, LOGO)
    assert served != css  # never served as written either
    assert "<" not in served and "evil" not in served


BENIGN = [
    "h1 { color: #0A7E3D }",
    ":root { --brand: #7B2D8E; } /* the brand colour */\nheader h1 { color: var(--brand) !important; }",
    ".logo { background: url('https://cdn.acme-towers.example/brand/bg.png') no-repeat center / cover; }",
    "main { background: url(https://cdn.acme-towers.example/bg.svg), linear-gradient(to right, #fff 0%, #eee) }",
    'ul > li + li, a:hover:not(.muted), tr:nth-child(2n+1), [data-testid="site-count"] { color: rgb(10 20 30 / 50%) }',
    "body { font: italic bold 14px/1.4 'Segoe UI', Roboto, sans-serif; margin: 0 auto; padding: calc(1rem + 2px) }",
    "button:focus-visible { outline: 2px dashed color-mix(in srgb, red 50%, blue); border-radius: 4px }",
    "th, td { border-bottom: 1px solid hsl(220deg 13% 91%); box-shadow: 0 1px 2px #0003; letter-spacing: .02em }",
    "h1::before { color: oklch(70% 0.1 200) }\n\ntable { border-collapse: collapse; }",
    "td { font-family: inherit } th { font: inherit; font-family: Helvetica Neue, Arial, sans-serif }",
    "a { color: red",  # unclosed at the end, as browsers close it
]


def meaning(css: str) -> list[Any]:
    """The rules as a browser reads them: selectors and declarations, token by token,
    comments dropped and runs of whitespace counted once."""

    def tokens(nodes: list[Any]) -> list[Any]:
        out: list[Any] = []
        for node in nodes:
            if node.type == "comment":
                continue
            if node.type == "whitespace":
                if out and out[-1] != " ":
                    out.append(" ")
                continue
            inner = getattr(node, "content", None) if node.type != "function" else node.arguments
            out.append(
                (node.type, getattr(node, "lower_name", None) or getattr(node, "value", None), tokens(inner or []))
            )
        while out and out[-1] == " ":
            out.pop()
        while out and out[0] == " ":
            out.pop(0)
        return out

    rules = []
    for rule in tinycss2.parse_stylesheet(css, skip_comments=True, skip_whitespace=True):
        body = [
            (d.lower_name, tokens(d.value), d.important)
            for d in tinycss2.parse_blocks_contents(rule.content, skip_comments=True, skip_whitespace=True)
        ]
        rules.append((tokens(rule.prelude), body))
    return rules


@pytest.mark.parametrize("css", BENIGN)
def test_a_benign_sheet_passes_and_is_served_with_the_same_meaning(css: str) -> None:
    assert custom_css.problem(css, LOGO) is None
    served = custom_css.sanitized(css, LOGO)
    assert meaning(served) == meaning(css), served
    assert "/*" not in served or "*/" in served


def test_a_stored_sheet_is_served_without_what_the_rules_refuse(caplog: pytest.LogCaptureFixture) -> None:
    # A row written before these rules (or under another logo): only what passes is served.
    stored = (
        "h1 { color: red; background: url(https://evil.example/x.png); font-weight: bold }\n"
        "@import 'https://evil.example/x.css';\n"
        "div { position: fixed }\n"
        "p { border: 1px solid #ccc; behavior: url(x.htc) }\n"
        "</style><script>alert(1)</script>"
    )
    with caplog.at_level(logging.WARNING, "towerco.custom_css"):
        served = custom_css.sanitized(stored, LOGO)
        assert custom_css.sanitized(stored, LOGO) == served
    assert meaning(served) == meaning("h1 { color: red; font-weight: bold }\np { border: 1px solid #ccc }")
    assert "<" not in served and "evil" not in served and "@" not in served
    # The operator learns it once per process: the first problem and how many.
    [record] = [r for r in caplog.records if r.name == "towerco.custom_css"]
    assert "line 1, column 30" in record.getMessage() and "(5 in all)" in record.getMessage(), record.getMessage()


def test_url_follows_the_logo_host() -> None:
    css = "h1 { background: url(https://cdn.acme-towers.example/x.png) }"
    assert custom_css.problem(css, LOGO) is None
    moved = custom_css.problem(css, "https://img.acme-towers.example/logo.svg")
    assert moved is not None and "img.acme-towers.example" in moved
    none = custom_css.problem(css, "")
    assert none is not None and "no logo_url" in none
    assert custom_css.sanitized(css, "https://img.acme-towers.example/logo.svg") == ""
    assert custom_css.problem(css, None) is None  # not known yet: judged against the stored logo later


def test_every_problem_is_counted_but_the_first_is_named() -> None:
    problem = custom_css.problem("h1 { position: fixed }\nh2 { z-index: 9 }\nh3 { top: 0 }", LOGO)
    assert problem is not None
    assert problem.startswith("line 1, column 6: property 'position'") and problem.endswith("(and 2 more)")


def test_any_text_is_judged_without_error_and_what_is_served_passes_again() -> None:
    # Seeded fragments of CSS, escapes and markup in any order: never an exception (an
    # INTERNAL), never a '<' served, and what is served passes the rules it was cut by.
    fragments = [*"abhx019#.:;,{}()[]\"'\\/*!@<>=~^$|+- \n%", "url(", "@import", "\\3c ", "\\75 ", "calc(", ":not("]
    fragments += ["--x:", "color:", "font:", "background:", "h1{", "[a=", LOGO, "https://evil.example/", "\x00", "é"]
    rng = random.Random(19)
    for _ in range(3000):
        css = "".join(rng.choice(fragments) for _ in range(rng.randint(1, 60)))
        custom_css.problem(css, LOGO)
        served = custom_css.sanitized(css, LOGO)
        assert "<" not in served, (css, served)
        assert not served or custom_css.problem(served, LOGO) is None, (css, served)
