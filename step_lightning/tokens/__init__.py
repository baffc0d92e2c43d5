"""dCTS / CTS token machinery: thresholds, layouts, supertoken embedding, policy network and targets."""
