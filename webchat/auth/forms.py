"""Account forms (Flask-WTF: CSRF and validation)."""
from flask_babel import lazy_gettext as _l
from flask_wtf import FlaskForm
from flask_wtf.file import FileField
from wtforms import BooleanField, PasswordField, StringField, TextAreaField
from wtforms.validators import DataRequired, Length, Optional, Regexp


class RegisterForm(FlaskForm):
    username = StringField(_l("Username"), validators=[
        DataRequired(), Length(3, 32),
        Regexp(r"^[A-Za-z0-9_.-]+$", message=_l("Only letters, digits, '_', '.' and '-'."))])
    name = StringField(_l("Nickname"), validators=[Optional(), Length(max=64)])
    password = PasswordField(_l("Password"), validators=[
        DataRequired(), Length(min=8, max=1024, message=_l("Passwords need 8 to 1024 characters."))])


class LoginForm(FlaskForm):
    username = StringField(_l("Username"), validators=[DataRequired(), Length(max=64)])
    password = PasswordField(_l("Password"), validators=[DataRequired(), Length(max=1024)])
    remember = BooleanField(_l("Keep me signed in"))


class ProfileForm(FlaskForm):
    name = StringField(_l("Nickname"), validators=[DataRequired(), Length(1, 64)])
    remark = TextAreaField(_l("Signature"), validators=[Optional(), Length(max=200)])
    avatar = FileField(_l("Avatar"))
    background = FileField(_l("Background image"))


class DeleteAccountForm(FlaskForm):
    password = PasswordField(_l("Password"), validators=[DataRequired(), Length(max=1024)])


class EmptyForm(FlaskForm):
    """A form with only the CSRF token, for buttons that POST."""
