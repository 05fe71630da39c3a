"""Methods that rotate or reflect what a layer computes with learned orthogonal maps."""
