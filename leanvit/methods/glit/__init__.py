"""GLiT (Chen et al., ICCV 2021): the weight-sharing supernet, its path sampling, and the hierarchical evolutionary
search over it."""
