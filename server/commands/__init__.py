"""The `beyond` commands: cli.py parses the command line and runs one of serve.py, worker.py, outpaint.py
or download.py; startup.py holds what serve and worker both do to start."""
