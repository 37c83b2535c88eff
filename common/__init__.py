"""Code shared by the fedtune server and client: config, models, data, privacy maths."""
