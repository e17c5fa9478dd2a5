"""Reading features: evaluation metrics, corpus feature statistics, diagnose, images."""
