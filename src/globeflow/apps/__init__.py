"""Applications: the shared pipeline, the command line and the web server."""
