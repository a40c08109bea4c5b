"""Account forms (Flask-WTF: CSRF and validation)."""
from flask_babel import lazy_gettext as _l
from flask_wtf import FlaskForm
from flask_wtf.file import FileField
from wtforms import BooleanField, PasswordField, StringField, TextAreaField
from wtforms.validators import DataRequired, Length, Optional, Regexp

from ..services.accounts import PASSWORD_MAX, PASSWORD_MIN

# Nothing longer is ever hashed: refused before any work, on every form that takes a password.
TOO_LONG = _l("Passwords are at most 128 characters.")


class RegisterForm(FlaskForm):
    username = StringField(_l("Username"), validators=[
        DataRequired(), Length(3, 32),
        Regexp(r"^[A-Za-z0-9_.-]+$", message=_l("Only letters, digits, '_', '.' and '-'."))])
    name = StringField(_l("Nickname"), validators=[Optional(), Length(max=64)])
    password = PasswordField(_l("Password"), validators=[
        DataRequired(), Length(min=PASSWORD_MIN, max=PASSWORD_MAX, message=_l("Passwords need 8 to 128 characters."))])


class LoginForm(FlaskForm):
    username = StringField(_l("Username"), validators=[DataRequired(), Length(max=64)])
    password = PasswordField(_l("Password"), validators=[DataRequired(), Length(max=PASSWORD_MAX, message=TOO_LONG)])
    remember = BooleanField(_l("Keep me signed in"))


class ProfileForm(FlaskForm):
    name = StringField(_l("Nickname"), validators=[DataRequired(), Length(1, 64)])
    remark = TextAreaField(_l("Signature"), validators=[Optional(), Length(max=200)])
    avatar = FileField(_l("Avatar"))
    background = FileField(_l("Background image"))


class DeleteAccountForm(FlaskForm):
    password = PasswordField(_l("Password"), validators=[DataRequired(), Length(max=PASSWORD_MAX, message=TOO_LONG)])


class PasswordForm(FlaskForm):
    current_password = PasswordField(_l("Current password"), validators=[
        DataRequired(), Length(max=PASSWORD_MAX, message=TOO_LONG)])
    new_password = PasswordField(_l("New password"), validators=[
        DataRequired(), Length(min=PASSWORD_MIN, max=PASSWORD_MAX, message=_l("Passwords need 8 to 128 characters."))])


class EmptyForm(FlaskForm):
    """A form with only the CSRF token, for buttons that POST."""
