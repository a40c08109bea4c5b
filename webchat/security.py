"""Response headers every answer carries: a Content-Security-Policy, no sniffing, no framing,
same-origin referrers, HSTS on https sites, and no copies of HTML kept by caches."""
from __future__ import annotations

import re
from functools import lru_cache

from flask import Flask, request

# A Host header that can be named in the policy as is (a name or an IPv6 literal, and a port).
_HOST = re.compile(r"(?:[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*|\[[0-9A-Fa-f:.]+\])(?::\d{1,5})?")
HSTS = "max-age=31536000; includeSubDomains"


@lru_cache(maxsize=32)
def content_security_policy(host: str | None) -> str:
    """Return the policy: only this site's own scripts and styles (nothing inline, no eval), its
    images (and data:/blob: ones), its own requests and socket; no plugins, no framing."""
    connect = "'self'"
    if host and _HOST.fullmatch(host):
        # CSP 3 counts ws:/wss: to this host as 'self'; browsers before it need the socket named.
        connect += f" ws://{host} wss://{host}"
    return "; ".join([
        "default-src 'self'",
        "script-src 'self'",
        # No 'unsafe-inline': no <style> element or style attribute in any page (the viewer's
        # own-message colours are a stylesheet of their own, chat.viewer_css).
        "style-src 'self'",
        "img-src 'self' data: blob:",
        f"connect-src {connect}",
        "font-src 'self'",
        "object-src 'none'",
        "base-uri 'self'",
        "form-action 'self'",
        "frame-ancestors 'none'",
    ])


def _on(value) -> bool:
    return value is True or str(value).strip().lower() in ("1", "true", "yes", "on")


def init_app(app: Flask) -> None:
    """Add the security headers to every response."""

    @app.after_request
    def security_headers(response):
        headers = response.headers
        headers.setdefault("Content-Security-Policy", content_security_policy(request.host))
        headers.setdefault("X-Content-Type-Options", "nosniff")
        headers.setdefault("Referrer-Policy", "same-origin")
        headers.setdefault("X-Frame-Options", "DENY")
        if _on(app.config.get("FORCE_HTTPS", False)):
            headers.setdefault("Strict-Transport-Security", HSTS)
        # Pages and fragments show one person's conversations (and carry their CSRF token): no
        # cache, shared or the browser's own, keeps a copy (nor shows it with Back after sign-out).
        # Signed-out pages too: their token belongs to the session. Routes that cache say so.
        if response.mimetype == "text/html" and "Cache-Control" not in headers:
            headers["Cache-Control"] = "no-store"
        return response
