"""The functional ops, one package per family (SPEC §1-§6).

Every family registers its backends the same way: ``ops/<family>/__init__.py`` imports ``api`` (the
validating entry points; the readable ``reference`` backend registers there) and then each
``<backend>_backend.py``, whose import registers that backend with :mod:`attnzoo.backends`. A backend
module imports no Triton or kernel code at import time -- kernels load on first use.
"""
