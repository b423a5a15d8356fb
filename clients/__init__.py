"""Python client library and command-line tools for the PagedServe GenerationService."""
