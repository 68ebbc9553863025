"""The Open Inference Protocol (KServe v2, Triton's HTTP API) in front of the same engine as the VAE routes.

`codec` reads and writes the protocol's bodies (JSON, and the binary tensor extension) as plain numpy arrays;
`routes` are its endpoints, thin: parse -> engine -> format; `errors` gives every answer on `/v2` the
protocol's error body. This package imports the service's core (engine, errors, settings); nothing outside
it but `app/main.py` imports it.
"""
