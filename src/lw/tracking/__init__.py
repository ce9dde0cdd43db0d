"""Tracking: the MLflow store and its lock, server health, run creation, the job folder and its
upload, resume, reading runs back. A sink: it never computes a metric."""
