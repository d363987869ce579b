"""Serving a released model: the command line (`cli`), the cached faiss index of a database folder (`index`), and
the checks that refuse a file that was not the one released (`trust`: sha256 against the registry, ed25519)."""
