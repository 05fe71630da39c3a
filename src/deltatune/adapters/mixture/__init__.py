"""Methods that mix several adapters with a learned gate."""
