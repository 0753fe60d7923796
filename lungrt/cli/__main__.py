from lungrt.cli import entrypoint

entrypoint()
