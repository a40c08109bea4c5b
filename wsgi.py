"""WSGI entry point: gunicorn wsgi:app, flask --app wsgi."""
from webchat import create_app

app = create_app()
