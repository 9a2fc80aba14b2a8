"""Similar-case retrieval: the index (FAISS + SQLite, no torch), embedding, the index workflow and its reports.

Importing this package imports nothing heavy: :mod:`covidcxr.retrieval.index` must stay usable without torch."""
