"""Accounts: register, sign in and out, profile, account deletion."""
from flask import Blueprint

bp = Blueprint("auth", __name__)

from . import routes  # noqa: E402,F401
