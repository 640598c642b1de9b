"""The web viewer: ``kobo open`` (a local server over a folder of runs).

Only the viewer imports Starlette and uvicorn; ``kohakuboard.client`` never
imports this package.  The HTTP API is documented in ``docs/viewer-api.md``.
"""
