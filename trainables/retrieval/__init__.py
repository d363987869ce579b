"""Retrieval: descriptor extraction, faiss nearest-neighbour ranking and the Oxford/Paris mAP protocol."""
