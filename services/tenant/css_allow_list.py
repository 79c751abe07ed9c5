"""What a tenant's custom CSS may hold (``custom_css.py`` judges a sheet against these lists).

Lists of what is allowed, never of what is not: a name missing here is refused. Names are
lower case, as tinycss2 decodes them.
"""

from __future__ import annotations

#: Properties a tenant may set (lower case). Nothing that positions, hides, overlays or
#: adds content: the page's layout and its security notices stay the platform's.
PROPERTIES = frozenset(
    """color accent-color caret-color
    background background-color background-image background-position background-position-x
    background-position-y background-size background-repeat background-origin background-clip
    border border-color border-style border-width border-top border-right border-bottom border-left
    border-top-color border-right-color border-bottom-color border-left-color border-top-style
    border-right-style border-bottom-style border-left-style border-top-width border-right-width
    border-bottom-width border-left-width border-collapse border-spacing
    border-radius border-top-left-radius border-top-right-radius border-bottom-left-radius
    border-bottom-right-radius outline outline-color outline-style outline-width outline-offset
    margin margin-top margin-right margin-bottom margin-left margin-block margin-inline
    padding padding-top padding-right padding-bottom padding-left padding-block padding-inline gap row-gap
    column-gap font font-family font-size font-weight font-style font-variant font-stretch line-height
    letter-spacing word-spacing text-align text-decoration text-decoration-color text-decoration-line
    text-decoration-style text-decoration-thickness text-underline-offset text-transform text-shadow
    white-space box-shadow""".split()
)
#: Font families a sheet may name (lower case): the generic families and fonts that
#: operating systems ship, so naming one never makes the browser fetch anything.
SAFE_FONTS = frozenset(
    """serif sans-serif monospace cursive fantasy system-ui ui-serif ui-sans-serif ui-monospace
    ui-rounded math emoji -apple-system blinkmacsystemfont""".split()
) | frozenset(
    name.strip()
    for name in """arial, helvetica, helvetica neue, segoe ui, roboto, noto sans, open sans, ubuntu,
    cantarell, verdana, tahoma, trebuchet ms, georgia, times, times new roman, garamond, courier,
    courier new, consolas, menlo, monaco, sfmono-regular, liberation sans, liberation serif,
    liberation mono, dejavu sans, dejavu serif, dejavu sans mono""".split(",")
)
#: Values every property takes, ``font-family`` included.
CSS_WIDE_KEYWORDS = frozenset("inherit initial unset revert revert-layer".split())
#: Idents of the ``font`` shorthand that are not family names.
FONT_KEYWORDS = CSS_WIDE_KEYWORDS | frozenset(
    """normal italic oblique bold bolder lighter small-caps condensed expanded semi-condensed
    semi-expanded extra-condensed extra-expanded ultra-condensed ultra-expanded xx-small x-small
    small medium large x-large xx-large xxx-large smaller larger caption icon menu message-box
    small-caption status-bar""".split()
)
#: Functions a value may use (lower case); ``url`` is judged apart.
FUNCTIONS = frozenset(
    """rgb rgba hsl hsla hwb lab lch oklab oklch color color-mix var calc min max clamp
    linear-gradient radial-gradient conic-gradient repeating-linear-gradient
    repeating-radial-gradient repeating-conic-gradient""".split()
)
PSEUDO_CLASSES = frozenset(
    """hover focus focus-visible focus-within active link any-link disabled enabled checked
    first-child last-child only-child first-of-type last-of-type only-of-type empty root
    placeholder-shown before after placeholder selection first-line first-letter marker""".split()
)
PSEUDO_FUNCTIONS = frozenset("not is where nth-child nth-last-child nth-of-type nth-last-of-type".split())
SELECTOR_LITERALS = frozenset({".", ",", ">", "+", "~", "*", ":"})
ATTRIBUTE_MATCHES = frozenset({"=", "~=", "|="})
#: Attributes whose values a selector may not test: what a user typed.
SECRET_ATTRIBUTES = frozenset({"value", "defaultvalue"})
VALUE_LITERALS = frozenset({",", "/", "+", "-", "*"})
