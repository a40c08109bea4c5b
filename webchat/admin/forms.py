"""Admin forms: the search box, and the admin flag switch (CSRF comes from Flask-WTF)."""
from flask_babel import lazy_gettext as _l
from flask_wtf import FlaskForm
from wtforms import IntegerField, SearchField
from wtforms.validators import AnyOf, InputRequired, Length, Optional


class SearchForm(FlaskForm):
    """GET search over users or conversations: no CSRF, bad input falls back to defaults."""

    class Meta:
        csrf = False

    q = SearchField(_l("Search"), validators=[Optional(), Length(max=64)])
    page = IntegerField(_l("Page"), validators=[Optional()])


class AdminFlagForm(FlaskForm):
    """Grant (1) or revoke (0) the admin flag."""

    grant = IntegerField(_l("Admin"), validators=[InputRequired(), AnyOf([0, 1], message=_l("Choose 1 or 0."))])
