"""Setting up a real federation: credentials, the Flower app bundle and the commands per role."""
