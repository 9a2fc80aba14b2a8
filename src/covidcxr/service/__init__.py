"""The one analysis call that the CLI, the web app and the PACS client share."""
