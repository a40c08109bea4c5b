"""Simplified Chinese translation: locale selection (?lang, cookie, Accept-Language) and catalog health."""
from __future__ import annotations

import functools
import os
import re

from babel.messages.extract import DEFAULT_KEYWORDS, extract_from_dir
from babel.messages.mofile import read_mo
from babel.messages.pofile import read_po

from webchat.extensions import db
from webchat.models import User
from webchat.services import conversations as convs

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRANSLATIONS = os.path.join(REPO, "webchat", "translations")
BABEL_CFG = os.path.join(TRANSLATIONS, "babel.cfg")
ZH_PO = os.path.join(TRANSLATIONS, "zh", "LC_MESSAGES", "messages.po")
ZH_MO = os.path.join(TRANSLATIONS, "zh", "LC_MESSAGES", "messages.mo")
# Same keywords as the documented `pybabel extract -k _l -k lazy_gettext` command.
KEYWORDS = {**DEFAULT_KEYWORDS, "_l": None, "lazy_gettext": None}


def page(response) -> str:
    assert response.status_code == 200, response.status_code
    return response.get_data(as_text=True)


# --- locale selection -------------------------------------------------------------------------

def test_english_is_the_default(client):
    html = page(client.get("/auth/login"))
    assert '<html lang="en">' in html
    assert "<h1>Sign in</h1>" in html
    assert "登录" not in html


def test_lang_query_parameter_shows_chinese_and_sets_cookie(client):
    response = client.get("/auth/login?lang=zh")
    html = page(response)
    assert '<html lang="zh-CN">' in html
    assert "<h1>登录</h1>" in html
    assert "Sign in" not in html
    assert "用户名" in html and "保持登录" in html  # lazy_gettext form labels are translated too
    cookies = response.headers.getlist("Set-Cookie")
    assert any(c.startswith("lang=zh;") for c in cookies), cookies


def test_lang_cookie_keeps_the_choice_on_the_next_request(client):
    page(client.get("/auth/login?lang=zh"))
    html = page(client.get("/auth/login"))  # no ?lang: the cookie decides
    assert "<h1>登录</h1>" in html
    html = page(client.get("/auth/register"))
    assert "注册账号" in html
    # ?lang=en switches back, and that choice sticks as well.
    assert "<h1>Sign in</h1>" in page(client.get("/auth/login?lang=en"))
    assert "<h1>Sign in</h1>" in page(client.get("/auth/login"))


def test_accept_language_zh_cn_picks_chinese(client):
    html = page(client.get("/auth/login", headers={"Accept-Language": "zh-CN,zh;q=0.9,en;q=0.8"}))
    assert '<html lang="zh-CN">' in html
    assert "<h1>登录</h1>" in html
    html = page(client.get("/auth/login", headers={"Accept-Language": "zh-CN"}))
    assert "<h1>登录</h1>" in html


def test_accept_language_other_than_zh_stays_english(client):
    html = page(client.get("/auth/login", headers={"Accept-Language": "fr-FR,fr;q=0.9"}))
    assert "<h1>Sign in</h1>" in html


def test_query_parameter_beats_accept_language(client):
    html = page(client.get("/auth/login?lang=en", headers={"Accept-Language": "zh-CN"}))
    assert "<h1>Sign in</h1>" in html


def test_signed_in_chat_page_in_chinese(app, client, users, auth):
    with app.test_request_context():
        alice, bob = (db.session.get(User, users[n]) for n in ("alice", "bob"))
        cid = convs.find_or_create_direct(alice, bob).id
    assert auth.login().status_code == 303
    html = page(client.get(f"/conversations/{cid}?lang=zh"))
    days = app.config["RETENTION_DAYS"]
    assert re.search(r'id="retention-note">\s*消息将在 %d 天后自动消失。\s*<' % days, html), "retention note"
    assert re.search(r'<button[^>]*id="compose-send"[^>]*>\s*发送\s*</button>', html), "compose button"
    assert 'placeholder="输入消息"' in html and "Enter 发送，Shift+Enter 换行。" in html
    assert "退出登录" in html and "发起群聊" in html
    assert "Messages disappear" not in html
    # And the same page without the cookie's choice is English.
    html = page(client.get(f"/conversations/{cid}?lang=en"))
    assert f"Messages disappear after {days} days." in html
    assert re.search(r'<button[^>]*id="compose-send"[^>]*>\s*Send\s*</button>', html)


def test_gettext_placeholders_survive_translation(app):
    from flask_babel import gettext, ngettext

    with app.test_request_context("/?lang=zh"):
        assert gettext("%(name)s is typing…", name="Bob") == "Bob 正在输入…"
        assert gettext("[Image]") == "[图片]"
        assert ngettext("%(num)d user", "%(num)d users", 3) == "3 位用户"


# --- catalog health: a stale or incomplete catalog fails CI --------------------------------------

def load_po():
    with open(ZH_PO, "rb") as fh:
        return read_po(fh, locale="zh")


def test_every_msgid_has_a_translation():
    catalog = load_po()
    assert len(catalog) > 0
    untranslated, fuzzy = [], []
    for message in catalog:
        if not message.id:
            continue
        strings = message.string if isinstance(message.string, (list, tuple)) else [message.string]
        if not all(s and s.strip() for s in strings):
            untranslated.append(message.id)
        if message.fuzzy:
            fuzzy.append(message.id)
    assert not untranslated, f"untranslated msgids in {ZH_PO}: {untranslated}"
    assert not fuzzy, f"fuzzy msgids in {ZH_PO} (review them and drop the fuzzy flag): {fuzzy}"


def test_translations_keep_their_placeholders():
    catalog = load_po()
    problems = [(m.id, [str(e) for e in errors]) for m, errors in catalog.check()]
    assert not problems, problems
    pattern = re.compile(r"%\(\w+\)[sd]")
    for message in catalog:
        if not message.id:
            continue
        ids = message.id if isinstance(message.id, (list, tuple)) else [message.id]
        strings = message.string if isinstance(message.string, (list, tuple)) else [message.string]
        wanted = set(pattern.findall(ids[-1])) | set(pattern.findall(ids[0]))
        for s in strings:
            assert set(pattern.findall(s)) == wanted, (message.id, s)


def test_mo_is_compiled_from_the_current_po():
    assert os.path.exists(ZH_MO), f"{ZH_MO} is missing: run pybabel compile -d webchat/translations"
    # Not older than the .po (1 s of slack: a fresh git checkout writes the two files in turn).
    assert os.path.getmtime(ZH_MO) + 1 >= os.path.getmtime(ZH_PO), (
        f"{ZH_MO} is older than {ZH_PO}: run pybabel compile -d webchat/translations")
    # And its content matches, whatever the timestamps say.
    with open(ZH_MO, "rb") as fh:
        compiled = {_key(m.id): _key(m.string) for m in read_mo(fh) if m.id}
    expected = {_key(m.id): _key(m.string) for m in load_po() if m.id and not m.fuzzy}
    assert compiled == expected, "messages.mo is stale: run pybabel compile -d webchat/translations"


def _key(value):
    return tuple(value) if isinstance(value, (list, tuple)) else value


@functools.lru_cache(maxsize=1)
def extracted() -> tuple:
    """(filename, lineno, message) for every string pybabel extract would find, per babel.cfg."""
    from babel.messages import frontend

    parse = getattr(frontend, "parse_mapping_cfg", None) or frontend.parse_mapping
    with open(BABEL_CFG) as fh:
        method_map, options_map = parse(fh, BABEL_CFG)
    return tuple((filename, lineno, message) for filename, lineno, message, _comments, _context
                 in extract_from_dir(REPO, method_map, options_map, keywords=KEYWORDS))


def test_catalog_covers_every_source_string():
    """Every _()/gettext/ngettext/_l string in webchat/ and templates/ is in the catalog."""
    found: dict = {}
    for filename, lineno, message in extracted():
        found.setdefault(message if isinstance(message, str) else message[0], f"{filename}:{lineno}")
    assert any(f.startswith("templates/") for f in found.values()), "templates were not scanned"
    assert any(f.startswith("webchat/") for f in found.values()), "python files were not scanned"
    catalog = load_po()
    missing = {k: where for k, where in found.items() if catalog.get(k) is None}
    assert not missing, (
        "strings missing from the zh catalog (re-extract, pybabel update, translate, compile): "
        f"{missing}")


def test_every_template_with_strings_was_extracted():
    """The jinja2 extractor silently skips a template it cannot parse; catch that."""
    scanned = {filename for filename, _lineno, _message in extracted()}
    call = re.compile(r"\b(?:_|gettext|ngettext)\(\s*['\"]")
    for dirpath, _dirs, files in os.walk(os.path.join(REPO, "templates")):
        for name in sorted(files):
            if not name.endswith(".html"):
                continue
            path = os.path.join(dirpath, name)
            with open(path, encoding="utf-8") as fh:
                if call.search(fh.read()):
                    rel = os.path.relpath(path, REPO).replace(os.sep, "/")
                    assert rel in scanned, f"{rel} has translatable strings but was not extracted"


def test_system_line_preview_is_shown_in_the_viewers_language(app, client, users, auth):
    from webchat.extensions import db
    from webchat.models import User
    from webchat.services.conversations import create_group

    with app.test_request_context():
        alice = db.session.get(User, users["alice"])
        create_group(alice, "Team", [users["bob"], users["carol"]])
    auth.login("bob")
    assert "Alice 创建了群聊“Team”" in page(client.get("/?lang=zh"))
    assert "Alice created the group “Team”" in page(client.get("/?lang=en"))
