"""Architecture search: GLiT's weight-sharing supernet, its path sampler and the hierarchical evolutionary search."""
