"""leukoscope: leukemia screening in blood-smear and bone-marrow microscopy.

Decision support for trained staff, not a diagnosis.
"""

__version__ = "0.1.0"
