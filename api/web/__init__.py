"""The web app for people: server-rendered pages under /app that call the same /v1 API.

Register with ``app.register_blueprint(web_blp)``.
"""

from api.web.views import web_blp

__all__ = ["web_blp"]
