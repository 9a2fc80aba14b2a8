"""The web app: FastAPI service and the static radiologist page."""
