"""dCTS / CTS token machinery: thresholds, layouts, supertoken embedding, policy, statistics."""
