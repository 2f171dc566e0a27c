"""The generated smears of the detection tests, for the GPU tests."""

from tests.detection.conftest import smear_root  # noqa: F401  (a pytest fixture)
