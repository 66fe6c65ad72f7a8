"""The weight-free CT engine (:mod:`.engine`) and its steps, one module per anatomical job."""
