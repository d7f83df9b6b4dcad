"""The optional compiled part of hpcproc (everything else is in pyproject.toml).

``hpcproc.transports._ring_accel``: the shm transport's ring in C. ``optional=True``:
where no C compiler (or no Python headers) is found, the build goes on without it and
the pure-Python ring (``hpcproc/transports/_shm_ring.py``) is used instead.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "hpcproc.transports._ring_accel",
            ["hpcproc/transports/_ring_accel.c"],
            extra_compile_args=["-O2", "-std=c11", "-Wall"],
            optional=True,
        )
    ]
)
