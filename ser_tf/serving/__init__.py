"""Serving: a trained model as SavedModel and TFLite artifacts, their runtime and checks.

``spec`` holds what a served model needs besides its graph (labels, rate, windowing, audio
conditioning); ``savedmodel`` writes the serving SavedModel and the fixed-length edge
graph; ``tflite`` converts the edge graph to TFLite in a subprocess; ``runtime`` runs any
artifact (Keras, SavedModel, TFLite) behind one interface; ``verify`` measures every
artifact against the Keras model; ``export`` does all of it for a trained workdir.
"""
