"""Telediagnosis web service: upload, result, hematologist review, export.

``create_app(settings)`` (in :mod:`leukoscope.service.app`) builds the FastAPI
application; ``leukoscope serve`` runs it with Uvicorn. Needs the ``service``
extra: ``pip install 'leukoscope[service]'``.
"""
