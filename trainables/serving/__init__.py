"""Serving a released model: the command line (`cli`) and the cached faiss index of a database folder (`index`)."""
