"""Weight-sharing supernets: the elastic layers and the elastic network, their training (one
training loop, early stopping, data-parallel training)."""
