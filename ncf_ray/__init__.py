"""ncf_ray: Neural Collaborative Filtering (He et al., WWW 2017) trained, tuned and served on Ray.

Stages: prepare (Ray Data) -> train (Ray Train) -> tune (Ray Tune) -> serve (Ray Serve).
See README.md for the commands and ../shared/ARCHITECTURE.md for the contracts.
"""

__version__ = "0.1.0"
