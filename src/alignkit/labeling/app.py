"""The labeling web app (Starlette; served by uvicorn): log in with a token, rank one item's responses at a
time (drag into order, or mark best and worst; ties allowed), skip, or flag as unsafe. Every submit is one
database transaction, so closing the browser loses nothing. Pages are Jinja2 templates with autoescape on: responses are model
outputs and are shown as text, never as HTML. Every POST carries a CSRF token (the session's; the login form's
is a double-submit cookie); the session cookie is HttpOnly and SameSite=Strict.
"""

from __future__ import annotations

import json
import secrets
from importlib import resources

from jinja2 import Environment
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.routing import Route

from alignkit.labeling import storage
from alignkit.labeling.export import agreement_of
from alignkit.labeling.storage import LabelError

COOKIE, LOGIN_CSRF = "alignkit_label", "alignkit_label_login"
HEADERS = {  # no inline script, no framing: a response that slipped past escaping still could not run
    "Content-Security-Policy": "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'",
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
}

_ENV = Environment(autoescape=True)
PAGE = _ENV.from_string("""<!doctype html><html><head><meta charset="utf-8"><title>alignkit label</title>
<style>body{font-family:sans-serif;max-width:60em;margin:1em auto}pre{white-space:pre-wrap}
.resp{border:1px solid #aaa;margin:.5em 0;padding:.5em;cursor:grab}.selected{outline:3px solid #36c}.best{background:#d8f5d8}.worst{background:#f5d8d8}
.err{color:#a00}</style></head><body>{% block body %}{% endblock %}
<script src="/label.js"></script></body></html>""")
LOGIN = _ENV.from_string("""{% extends page %}{% block body %}<h1>alignkit label: log in</h1>
{% if error %}<p class="err">{{ error }}</p>{% endif %}
<form method="post" action="/login"><input type="hidden" name="csrf" value="{{ csrf }}">
<label>Token <input type="password" name="token" autofocus></label> <button>Log in</button></form>
{% endblock %}""")
ITEM = _ENV.from_string("""{% extends page %}{% block body %}
<p>{{ who.name }} · item {{ shown.done + 1 }} of {{ shown.total }}
<form method="post" action="/logout" style="display:inline"><input type="hidden" name="csrf" value="{{ who.csrf }}">
<button>log out</button></form></p>
<h2>Prompt</h2>{% if prompt_text is string %}<pre>{{ prompt_text }}</pre>{% else %}
{% for m in prompt_text %}<p><b>{{ m.role }}</b></p><pre>{{ m.content }}</pre>{% endfor %}{% endif %}
<p>Drag the responses into order, best at the top; "tie" gives a response the rank of the one above.
Keys: up/down select, u/d move the selected response up/down, t tie it, 1-9 best, shift+1-9 worst (ties
allowed), enter submit, s skip, f flag unsafe.</p>
<form method="post" action="/submit" id="rank"><input type="hidden" name="csrf" value="{{ who.csrf }}">
<input type="hidden" name="item_id" value="{{ shown.item_id }}">
<input type="hidden" name="ranking" id="ranking" value="">
<div id="responses">{% for text in shown.responses %}
<div class="resp" draggable="true" data-n="{{ loop.index }}"><b>{{ loop.index }}</b>
<label><input type="checkbox" class="best" name="best" value="{{ loop.index }}"> best</label>
<label><input type="checkbox" class="worst" name="worst" value="{{ loop.index }}"> worst</label>
<label><input type="checkbox" class="tie"> tie with the one above</label><pre>{{ text }}</pre></div>
{% endfor %}</div>
<p>Ranking to submit (best first): <b id="preview"></b></p>
<button name="action" value="ranked" id="submit">Submit (enter)</button>
<button name="action" value="skip" id="skip">Skip (s)</button>
<button name="action" value="flag" id="flag">Flag unsafe (f)</button></form>{% endblock %}""")
DONE = _ENV.from_string("""{% extends page %}{% block body %}<h1>All done, {{ who.name }}</h1>
<p>Every item has your label. Thank you.</p>{% endblock %}""")
ADMIN = _ENV.from_string("""{% extends page %}{% block body %}<h1>Labelers</h1>
<p>Items: <span id="items">{{ total }}</span>.</p><table border="1">
<tr><th>name</th><th>done</th><th>ranked</th><th>skipped</th><th>flagged</th></tr>
{% for c in counts %}<tr><td>{{ c.name }}{% if c.admin %} (admin){% endif %}</td>
<td>{{ c.ranked + c.skip + c.flag }} of {{ total }}</td><td>{{ c.ranked }}</td>
<td>{{ c.skip }}</td><td>{{ c.flag }}</td></tr>{% endfor %}</table>
<h2>Agreement</h2><p>Items with several rankings: <span id="items-multi">{{ ag.items_multi }}</span>.
Pairwise agreement: <span id="pairwise">{{ fmt(ag.pairwise_agreement) }}</span>.
Krippendorff's alpha (interval, on ranks): <span id="alpha">{{ fmt(ag.alpha) }}</span>.</p>
<table border="1"><tr><th>labeler</th><th>agreement with the rest</th><th>comparisons</th></tr>
{% for name, s in ag.labelers.items() %}<tr><td>{{ name }}</td><td>{{ fmt(s.agreement) }}</td>
<td>{{ s.comparisons }}</td></tr>{% endfor %}</table>
<p>Low agreement (below {{ ag.low_agreement_threshold }}): <span id="low">{{ ag.low_agreement | join(", ")
  or "none" }}</span></p>
<h2>Items with several rankings, least agreement first</h2><table border="1" id="items-agreement">
<tr><th>item</th><th>rankings</th><th>pairwise agreement</th><th>alpha</th></tr>
{% for id, s in items %}<tr><td>{{ id + 1 }}</td><td>{{ s.rankings }}</td><td>{{ fmt(s.pairwise_agreement) }}</td>
<td>{{ fmt(s.alpha) }}</td></tr>{% endfor %}</table>
{% if ag.items_multi > items | length %}<p>and {{ ag.items_multi - items | length }} more</p>{% endif %}
{% endblock %}""")
ADMIN_ITEMS = 100  # the admin page lists this many items with several rankings, the least agreed first
ERROR = _ENV.from_string("""{% extends page %}{% block body %}<h1>{{ status }}</h1><p class="err">{{ message }}</p>
<p><a href="/">back</a></p>{% endblock %}""")

# The ranking controls (drag, keyboard, best/worst marks) as a file of their own, served as /label.js.
SCRIPT = resources.files("alignkit.labeling").joinpath("label.js").read_text(encoding="utf-8")


def render(template, status: int = 200, **values) -> HTMLResponse:
    return HTMLResponse(template.render(page=PAGE, **values), status_code=status, headers=HEADERS)


def ranking_from_form(form) -> object:
    """The ranking the page's script (label.js) wrote: JSON groups, best first."""
    raw = form.get("ranking")
    if not raw:  # the script builds the ranking from the drag order and the best/worst marks
        raise LabelError(400, "ranking: missing; the page's script writes it (is JavaScript off?)")
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        raise LabelError(400, "ranking: not JSON") from None


def fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def create_app(engine, low_agreement: float = 0.5) -> Starlette:
    """The app over a database that ``storage.open_db`` opened and ``storage.load_items`` filled; the admin
    page lists labelers whose agreement with the rest is below ``low_agreement``."""

    async def who_of(request: Request):
        return await run_in_threadpool(storage.session_of, engine, request.cookies.get(COOKIE))

    async def home(request: Request) -> Response:
        who = await who_of(request)
        if who is None:
            return RedirectResponse("/login", status_code=303)
        shown = await run_in_threadpool(storage.current_item, engine, who.labeler_id)
        if shown is None:
            return render(DONE, who=who)
        return render(ITEM, who=who, shown=shown, prompt_text=shown.prompt)

    async def login_page(request: Request) -> Response:
        csrf = secrets.token_urlsafe(32)
        response = render(LOGIN, csrf=csrf, error=None)
        response.set_cookie(LOGIN_CSRF, csrf, httponly=True, samesite="strict")
        return response

    async def login(request: Request) -> Response:
        form = await request.form()
        cookie, sent = request.cookies.get(LOGIN_CSRF, ""), str(form.get("csrf", ""))
        if not cookie or not secrets.compare_digest(cookie, sent):
            raise LabelError(403, "login form expired or forged (CSRF check failed); reload the page")
        sid, _ = await run_in_threadpool(storage.login, engine, str(form.get("token", "")))
        response = RedirectResponse("/", status_code=303)
        response.set_cookie(COOKIE, sid, httponly=True, samesite="strict")
        response.delete_cookie(LOGIN_CSRF)
        return response

    async def checked(request: Request):
        """The session of a POST, its CSRF token checked; a 401/403 LabelError otherwise."""
        who = await who_of(request)
        if who is None:
            raise LabelError(401, "not logged in (or the session ended); log in again")
        form = await request.form()
        if not secrets.compare_digest(who.csrf, str(form.get("csrf", ""))):
            raise LabelError(403, "CSRF check failed; reload the page")
        return who, form

    async def submit(request: Request) -> Response:
        who, form = await checked(request)
        try:
            item_id = int(str(form.get("item_id", "")))
        except ValueError:
            raise LabelError(400, "item_id: expected an integer") from None
        kind = str(form.get("action", ""))
        ranking = ranking_from_form(form) if kind == "ranked" else None
        await run_in_threadpool(storage.submit, engine, who.labeler_id, item_id, kind, ranking)
        return RedirectResponse("/", status_code=303)

    async def logout(request: Request) -> Response:
        await checked(request)
        await run_in_threadpool(storage.logout, engine, request.cookies[COOKIE])
        response = RedirectResponse("/login", status_code=303)
        response.delete_cookie(COOKIE)
        return response

    async def admin(request: Request) -> Response:
        who = await who_of(request)
        if who is None or not who.is_admin:
            raise LabelError(403, "the admin page needs an admin's login")
        counts = await run_in_threadpool(storage.labeler_counts, engine)
        total = await run_in_threadpool(storage.count_items, engine)
        ag = await run_in_threadpool(agreement_of, engine, low_agreement)
        items = sorted(ag["items"].items(), key=lambda kv: (kv[1]["pairwise_agreement"], kv[0]))[:ADMIN_ITEMS]
        return render(ADMIN, counts=counts, total=total, ag=ag, items=items, fmt=fmt)

    async def script(request: Request) -> Response:
        return Response(SCRIPT, media_type="text/javascript", headers=HEADERS)

    async def no_icon(request: Request) -> Response:  # browsers ask for one; a 404 would be logged each page
        return Response(status_code=204)

    async def refused(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, LabelError)
        return render(ERROR, status=exc.status, message=str(exc))

    return Starlette(
        routes=[
            Route("/", home),
            Route("/login", login_page, methods=["GET"]),
            Route("/login", login, methods=["POST"]),
            Route("/submit", submit, methods=["POST"]),
            Route("/logout", logout, methods=["POST"]),
            Route("/admin", admin),
            Route("/label.js", script),
            Route("/favicon.ico", no_icon),
        ],
        exception_handlers={LabelError: refused},
    )
