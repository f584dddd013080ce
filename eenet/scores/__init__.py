"""Exit caches -> [n_samples, n_exits] readiness scores."""
