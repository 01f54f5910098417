"""The kt-kernel expert backend, by concern: the kernels (`kernels.py`), their thread pools
(`pool.py`), the caller's share of the rows (`row_split.py`), the on-disk quantization cache
(`cache.py`), kt's C++ output kept quiet (`quiet.py`), and the backend itself (`backend.py`)."""
