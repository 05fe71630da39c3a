"""Methods whose update is a structured full-size matrix from few numbers: spectral, circulant, sparse, sharded."""
