"""The HTTP layer: the FastAPI app (app.py), its one middleware, dependencies, routes/, schemas, the error
answers (errors.py), result bodies (results.py) and the submission of a request (submission.py)."""
