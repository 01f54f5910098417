"""Routed INT4 experts as integer dot products: our own kernel (`int4_moe.cpp`), built here with
the system's C++ compiler on first use (`library.py`) and run as one backend (`backend.py`)."""
