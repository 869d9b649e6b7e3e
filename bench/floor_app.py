"""The HTTP floor: a Flask app with nothing in its views, served as the API is.

``bench.bookkeeping`` runs it under the API's own ``gunicorn.conf.py`` (same worker
class, processes, threads and access log) and posts the same JSON body as a job
submission, so what its processes spend per request is what gunicorn and Flask cost
before any of the service's own work: no authentication, SQL, queue or wait.
"""

from __future__ import annotations

import uuid

from flask import Flask, jsonify, request

app = Flask(__name__)


@app.get("/healthz")
def healthz():
    return {"status": "ok"}


@app.post("/v1/jobs")
def create_job():
    body = request.get_json()
    job = {"id": str(uuid.uuid4()), "status": "queued", "input": {"url": body["url"]}}
    return jsonify(job), 202
