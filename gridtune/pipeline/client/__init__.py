"""Talking to a model server: the backend, the local service, HTTP, rate limits, the request pool."""
