"""RIFormer (Wang et al., CVPR 2023): module imitation of a teacher with a token mixer."""
