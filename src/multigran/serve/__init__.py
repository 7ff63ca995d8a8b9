"""`multigran serve`: an OpenAI-compatible HTTP server with dynamic batching (FastAPI + uvicorn, the `serve` extra).

schema.py parses requests, media.py reads their images, scheduler.py batches them on the model thread, app.py holds
the routes and response formats, page.html the web page, cli.py the command.
"""
