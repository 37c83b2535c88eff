"""Tasks: the record shape a site brings and what the model learns from it (the registry is ``registry.py``)."""
