"""Did tuning help: the playground, the held-out eval and its metrics, promotion, scaling."""
