"""Running the service as processes: one, or several worker processes on one port (`--workers N`).

process.py sets up any server process (logging, the interpreter's collector and GIL settings). With
several workers, uvicorn's own process supervisor runs them (supervisor.py, in the parent); they share a
directory per server start (rundir.py) for prometheus_client's multiprocess files, their control sockets
and the model directory being served, and a reload runs on every worker or on none (group.py). This
package may import the app's core and app.main; only app.cli imports it.
"""
