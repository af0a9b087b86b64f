"""``GET /docs``: the API described from its OpenAPI schema as one self-contained HTML page.

FastAPI's own ``/docs`` loads Swagger UI from a CDN, so on an offline machine (where students are often
deployed) it is a blank page. This page needs nothing but the server: every route with its parameters,
request bodies and a curl line; the machine-readable schema stays at ``/openapi.json``."""

from __future__ import annotations

import html
import json

METHODS = ("get", "post", "put", "delete", "patch")


def _params(op: dict) -> str:
    rows = []
    for p in op.get("parameters", []):
        schema = p.get("schema", {})
        kind = schema.get("type") or " or ".join(s.get("type", "?") for s in schema.get("anyOf", []))
        rows.append(f"<li><code>{html.escape(p.get('name', ''))}</code> ({html.escape(p.get('in', ''))}, "
                    f"{html.escape(kind)}{', required' if p.get('required') else ''})"
                    f"{' - ' + html.escape(p['description']) if p.get('description') else ''}</li>")
    return f"<p>Parameters:</p><ul>{''.join(rows)}</ul>" if rows else ""


def _body(op: dict) -> str:
    content = (op.get("requestBody") or {}).get("content") or {}
    if not content:
        return ""
    parts = []
    for mime, spec in content.items():
        desc = spec.get("schema", {}).get("description") or ""
        example = spec.get("example")
        shown = f"<pre>{html.escape(json.dumps(example, indent=2))}</pre>" if example is not None else ""
        parts.append(f"<li><code>{html.escape(mime)}</code>{' - ' + html.escape(desc) if desc else ''}{shown}</li>")
    return f"<p>Request body:</p><ul>{''.join(parts)}</ul>"


def _curl(path: str, method: str, op: dict) -> str:
    if method == "get":
        return f"curl http://HOST:PORT{path}"
    content = (op.get("requestBody") or {}).get("content") or {}
    if "multipart/form-data" in content:
        return f"curl -F files=@photo.jpg 'http://HOST:PORT{path}?top_k=3'"
    return f"curl -X {method.upper()} http://HOST:PORT{path}"


def docs_html(schema: dict) -> str:
    """The page for an OpenAPI ``schema`` (FastAPI's ``app.openapi()``)."""
    info = schema.get("info", {})
    sections = []
    for path, item in schema.get("paths", {}).items():
        for method in METHODS:
            op = item.get(method)
            if op is None:
                continue
            sections.append(
                f"<section><h2><code>{method.upper()} {html.escape(path)}</code></h2>"
                f"<p>{html.escape(op.get('summary', ''))}</p>"
                f"{'<p>' + html.escape(op['description']) + '</p>' if op.get('description') else ''}"
                f"{_params(op)}{_body(op)}<pre>{html.escape(_curl(path, method, op))}</pre></section>")
    title = html.escape(info.get("title", "API"))
    return ("<!doctype html><html lang='en'><head><meta charset='utf-8'>"
            f"<title>{title}: API</title><style>body{{font-family:sans-serif;max-width:52rem;margin:2rem auto;"
            "padding:0 1rem}pre{background:#f4f4f4;padding:.5rem;overflow:auto}section{border-top:1px solid #ddd}"
            "</style></head><body>"
            f"<h1>{title}</h1><p>{html.escape(info.get('description', ''))}</p>"
            "<p>The machine-readable schema: <a href='openapi.json'>/openapi.json</a>. The page to try it: "
            "<a href='./'>/</a>.</p>" + "".join(sections) + "</body></html>")
