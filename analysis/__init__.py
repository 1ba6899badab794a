"""MLflow runs -> the paper's tables and figures."""
