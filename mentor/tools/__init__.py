"""Tool use (arXiv 2510.18383): call parsing and rendering (:mod:`mentor.tools.calls`), the sandbox, the loop."""
