"""The chat: conversation list, chat pages, messages, groups and images."""
from flask import Blueprint

bp = Blueprint("chat", __name__)

from . import routes  # noqa: E402,F401
