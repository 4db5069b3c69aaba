"""Server-rendered HTML: the package's templates (``service/web/templates``) filled with escaped
values, and the headers every page carries.

Templates are ``string.Template`` files (``$name`` placeholders; every value is HTML-escaped
here, so a template cannot forget to). Pages hold no inline script: the Content-Security-Policy
allows scripts from this origin only, and the page's data arrives through the JSON API.
"""

from __future__ import annotations

import html
from functools import cache
from importlib import resources
from string import Template

from fastapi.responses import HTMLResponse

#: Pages load scripts, styles and images from this origin only, and no one may frame them
#: (a framed delete button is a clickjacking target).
PAGE_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; img-src 'self' data: blob:; style-src 'self'; script-src 'self'; "
        "connect-src 'self' https: http:; frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
    ),
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}


@cache
def _template(name: str) -> Template:
    text = (resources.files("dicom_cloud.service") / "web" / "templates" / name).read_text("utf-8")
    return Template(text)


def render(name: str, **values: object) -> str:
    """The template ``name`` with every value escaped."""
    return _template(name).substitute({k: html.escape(str(v), quote=True) for k, v in values.items()})


def page(name: str, status: int = 200, **values: object) -> HTMLResponse:
    return HTMLResponse(render(name, **values), status_code=status, headers=PAGE_HEADERS)


def message_page(
    title: str, message: str, status: int, *, link: str = "/", link_text: str = "Home"
) -> HTMLResponse:
    """A page that says what happened in words (expired share links, a viewer not installed)."""
    return page("message.html", status, title=title, message=message, link=link, link_text=link_text)


def wants_html(accept: str | None) -> bool:
    """Whether the client is a browser navigating (Accept names text/html before JSON)."""
    if not accept:
        return False
    kinds = [part.split(";")[0].strip().lower() for part in accept.split(",")]
    if "text/html" not in kinds:
        return False
    return "application/json" not in kinds or kinds.index("text/html") < kinds.index("application/json")
