"""The alternative a user would build from the seed apps: Flask, one image per request.

``gunicorn bench.seed_app:app``. Each gunicorn worker process loads MobileNet once
(the same Keras MobileNet 0.75 and weights as the service) and ``/predict``
downloads the URL (or reads the upload), decodes and resizes that one image,
runs the model on it and answers the top label, as the seed apps do.
No accounts, tokens, SQL or queue: strictly less work per image than the service.

``SEED_PREDICT=predict_on_batch`` (the default) calls ``model.predict_on_batch``: the
strongest simple synchronous app, since Keras' ``model.predict`` builds a data pipeline
and a progress callback on every call (several ms per image). ``SEED_PREDICT=predict``
calls ``model.predict`` as the seed apps literally do.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import keras
import numpy as np
import requests
from flask import Flask, jsonify, request
from PIL import Image

mobilenet = keras.applications.mobilenet
model = keras.applications.MobileNet(alpha=0.75, weights="imagenet")
PREDICT = os.environ.get("SEED_PREDICT", "predict_on_batch")
if PREDICT not in ("predict_on_batch", "predict"):
    raise SystemExit(f"SEED_PREDICT must be predict_on_batch or predict, not {PREDICT!r}")


def run_model(x: np.ndarray) -> np.ndarray:
    if PREDICT == "predict":
        return model.predict(x, verbose=0)
    return np.asarray(model.predict_on_batch(x))


run_model(np.zeros((1, 224, 224, 3), dtype=np.float32))  # warm up
mobilenet.decode_predictions(np.zeros((1, 1000)), top=1)  # loads the class index once

app = Flask(__name__)

if os.environ.get("SEED_READY_DIR"):
    (Path(os.environ["SEED_READY_DIR"]) / str(os.getpid())).touch()


@app.get("/healthz")
def healthz():
    return {"status": "ok"}


@app.post("/predict")
def predict():
    if "file" in request.files:
        data = request.files["file"].read()
    else:
        resp = requests.get(request.get_json()["url"], timeout=10)
        resp.raise_for_status()
        data = resp.content
    image = Image.open(io.BytesIO(data)).convert("RGB").resize((224, 224))
    x = mobilenet.preprocess_input(np.expand_dims(np.asarray(image, dtype=np.float32), 0))
    preds = run_model(x)
    _, label, score = mobilenet.decode_predictions(preds, top=1)[0][0]
    return jsonify({"predicted_class": label, "confidence_score": float(score)})
