"""Our CPU kernels in C++ (`int4_moe.cpp`: routed INT4 experts), built here on first use into one
shared library (`build.py`)."""
